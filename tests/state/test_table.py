import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stream_lstm.state.table import DeviceTable


def make(max_devices=4, **kw):
    return DeviceTable(max_devices=max_devices, window=3, n_features=1, num_layers=1,
                       hidden_size=2, initial_capacity=2, **kw)


def test_grows_by_doubling_up_to_max_and_keeps_state():
    t = make(max_devices=4)
    slots = t.slots_for(["a", "b"], [0, 0], now=1.0)
    t.h[:, slots[0]] = 7.0
    t.slots_for(["c"], [1], now=2.0)
    assert t.capacity == 4 and len(t) == 3
    assert torch.all(t.h[:, t.index["a"]] == 7.0)


def test_lru_eviction_hands_snapshot_out_and_reload_restores_it():
    evicted = []
    t = make(max_devices=2, on_evict=evicted.append)
    s = t.slots_for(["a", "b"], [0, 1], now=1.0)
    t.h[:, s[0]] = 3.0
    t.norm.update(s[:1], np.array([[5.0]]))
    t.slots_for(["b"], [1], now=2.0)  # b is now most recent, a is the LRU
    t.slots_for(["c"], [0], now=3.0)
    assert [e.device_id for e in evicted] == ["a"] and "a" not in t.index
    snap = evicted[0]
    assert snap.h[0, 0] == 3.0 and snap.mean[0] == 5.0 and snap.count == 1
    t.slots_for(["a"], [0], now=4.0, load=lambda dev: snap if dev == "a" else None)
    slot = t.index["a"]
    assert torch.all(t.h[:, slot] == 3.0) and t.norm.mean[slot, 0] == 5.0
    assert [e.device_id for e in evicted] == ["a", "b"]


def test_snapshot_round_trip_and_shape_change_leaves_hc_zero():
    t = make()
    s = t.slots_for(["a"], [3], now=1.0)
    t.h[:, s[0]] = 1.5
    t.window.push(s, np.array([[0.25]], np.float32))
    snap = t.snapshot(int(s[0]))
    other = make()
    slot = other.restore(snap)
    assert torch.all(other.h[:, slot] == 1.5) and other.window.ordered(slot).tolist() == [[0.25]]
    bigger = DeviceTable(max_devices=4, window=3, n_features=1, num_layers=1, hidden_size=5)
    slot = bigger.restore(snap)
    assert torch.all(bigger.h[:, slot] == 0) and bigger.model_version[slot] == ""


def test_last_seen_and_partitions():
    t = make()
    t.slots_for(["a"], [0], now=1.0)
    t.slots_for(["b"], [1], now=5.0)
    assert t.last_seen[[t.index["a"], t.index["b"]]].tolist() == [1.0, 5.0]
    assert t.devices_in_partitions({1}) == ["b"]
    t.drop(["a"])
    assert len(t) == 1 and "a" not in t.index


def test_drift_ring_and_calibration_move_with_the_snapshot_and_survive_growth():
    t = make(max_devices=8)
    t.ensure_horizon(3)
    s = t.slots_for(["a", "b"], [0, 0], now=1.0)
    t.drift_mu[s[0]] = [1.0, 2.0, 3.0]
    t.drift_b[s[0]] = [0.5, 0.5, 0.25]
    t.interval_log_m[s[0]] = [0.5, -0.25]
    t.slots_for(["c", "d", "e"], [0, 0, 0], now=2.0)  # grows past the initial capacity
    assert t.drift_mu[t.index["a"]].tolist() == [1.0, 2.0, 3.0]
    snap = t.snapshot(t.index["a"])
    fresh = make()  # a table that has not served a model yet adopts the snapshot's ring
    slot = fresh.restore(snap)
    assert fresh.drift_mu[slot].tolist() == [1.0, 2.0, 3.0]
    assert fresh.drift_b[slot].tolist() == [0.5, 0.5, 0.25]
    assert fresh.interval_log_m[slot].tolist() == [0.5, -0.25]  # the calibration moves too
    other_h = make()
    other_h.ensure_horizon(5)  # the model's horizon changed: the old ring does not apply
    assert np.isnan(other_h.drift_mu[other_h.restore(snap)]).all()


def test_experts_move_with_the_snapshot_and_take_no_memory_when_off():
    from stream_lstm import experts

    t = make(max_devices=8)
    s = t.slots_for(["a"], [0], now=1.0)
    t.experts[s[0], 0] = 42.0  # a marker: the two oldest readings of the history
    t.slots_for(["b", "c", "d"], [0, 0, 0], now=2.0)  # grows past the initial capacity
    snap = t.snapshot(t.index["a"])
    assert snap.experts.shape == (experts.PACKED_SIZE,)
    on = make()
    np.testing.assert_array_equal(on.experts[on.restore(snap)], t.experts[t.index["a"]])
    assert on.experts[on.index["a"], 0] == 42.0

    off = make(max_devices=8, with_experts=False)
    off.slots_for(["x", "y", "z"], [0, 0, 0], now=1.0)  # grows, still without expert state
    assert off.experts.nbytes == 0
    slot = off.restore(snap)  # a snapshot with experts is accepted; their state is dropped
    assert off.snapshot(slot).experts.shape == (0,)
    back = on.restore(off.snapshot(slot))  # ... and a table with experts starts them afresh
    np.testing.assert_array_equal(on.experts[back], experts.init_state(1)[0])


def test_likelihood_model_and_an_open_alert_move_with_the_snapshot_through_the_codec():
    from stream_lstm import alerts, likelihood
    from stream_lstm.checkpointing.codec import decode_snapshot, encode_snapshot

    t = DeviceTable(max_devices=4, window=3, n_features=1, num_layers=1, hidden_size=2)
    a, b = t.slots_for(["open", "calm"], partitions=[0, 0], now=0.0)
    state = t.likelihood[[a, b]]
    for k in range(50):
        likelihood.judge(state, np.array([1.0 + k % 3, 2.0]), np.array([10.0 + k % 5, 3.0]))
    t.likelihood[[a, b]] = state
    t.alert[a] = [100.0, 160.0, 0.99999, 130.0, 42.0, 1.0, 2.0]
    snaps = {s.device_id: decode_snapshot(encode_snapshot(s)) for s in t.snapshots(np.array([a, b]))}
    assert "alert" not in snaps["calm"].columns and "alert" in snaps["open"].columns  # sparse
    fresh = DeviceTable(max_devices=4, window=3, n_features=1, num_layers=1, hidden_size=2)
    for dev, slot in (("open", a), ("calm", b)):
        restored = fresh.restore(snaps[dev])
        np.testing.assert_array_equal(fresh.likelihood[restored], t.likelihood[slot])
        np.testing.assert_array_equal(fresh.alert[restored], t.alert[slot])
    assert alerts.is_open(fresh.alert[[fresh.index["open"], fresh.index["calm"]]]).tolist() == [True, False]
    # An armed device (one marginal flag, no alert open yet) restores armed, its range with it.
    (d,) = t.slots_for(["armed"], partitions=[0], now=0.0)
    t.alert[d] = [np.nan, 160.0, 0.9995, 160.0, 42.0, 1.0, 2.0]
    t.value_range[d] = [1.0, 9.0, 250.0]
    back = fresh.restore(decode_snapshot(encode_snapshot(t.snapshot(d))))
    assert alerts.is_armed(fresh.alert[[back]]).tolist() == [True]
    np.testing.assert_array_equal(fresh.value_range[back], [1.0, 9.0, 250.0])
    # A slot handed to a new device starts with no alert and an unscored model.
    t.drop(["open"])
    (c,) = t.slots_for(["new"], partitions=[0], now=1.0)
    assert not alerts.is_open(t.alert[[c]])[0] and not t.likelihood[c].any()


def test_a_newly_declared_column_survives_growth_eviction_the_codec_and_restore_with_no_other_edit():
    from stream_lstm.checkpointing.codec import decode_snapshot, encode_snapshot
    from stream_lstm.state.columns import COLUMNS, Column

    # Declared here, and nowhere else: no snapshot attribute, no codec change.
    gain = Column("gain", width=3, dtype=np.float32, fill=0.5)
    hits = Column("hits", dtype=np.int32, fill=-1)
    evicted = []
    t = DeviceTable(max_devices=2, window=3, n_features=1, num_layers=1, hidden_size=2,
                    initial_capacity=1, on_evict=lambda s: evicted.append(decode_snapshot(encode_snapshot(s))),
                    columns=(*COLUMNS, gain, hits))
    (a,) = t.slots_for(["a"], [0], now=1.0)
    t.gain[a] = [1.0, 2.0, np.nan]
    t.hits[a] = 2**31 - 1
    t.slots_for(["b"], [0], now=2.0)  # grows from 1 slot to 2
    assert t.capacity == 2 and t.gain[a].tolist()[:2] == [1.0, 2.0] and t.hits[a] == 2**31 - 1
    t.slots_for(["c"], [0], now=3.0)  # evicts a, through the codec
    back = evicted[0]
    assert back.columns["gain"].dtype == np.float32 and back.columns["gain"].tolist()[:2] == [1.0, 2.0]
    assert back.columns["hits"].dtype == np.int32 and back.columns["hits"] == 2**31 - 1
    assert back.schema == t.schema != DeviceTable(1, 2, 1, 1, 1).schema  # the header says which
    assert t.gain[t.index["c"]].tolist() == [0.5, 0.5, 0.5] and t.hits[t.index["c"]] == -1  # fills
    t.slots_for(["a"], [0], now=4.0, load=lambda dev: back if dev == "a" else None)
    slot = t.index["a"]
    assert t.gain[slot].tobytes() == np.array([1.0, 2.0, np.nan], np.float32).tobytes()
    assert t.hits[slot] == 2**31 - 1
    # A snapshot from before the columns existed (an older writer) restores them to the fill ...
    plain = DeviceTable(max_devices=2, window=3, n_features=1, num_layers=1, hidden_size=2)
    (p,) = plain.slots_for(["old"], [0], now=1.0)
    plain.n_seen[p] = 9
    slot = t.restore(decode_snapshot(encode_snapshot(plain.snapshot(p))))
    assert t.gain[slot].tolist() == [0.5, 0.5, 0.5] and t.hits[slot] == -1 and t.n_seen[slot] == 9
    # ... and a table without them (an older reader) ignores them and restores the rest.
    (a,) = plain.slots_for(["a"], [0], now=5.0, load=lambda dev: back)
    assert plain.n_seen[a] == back.n_seen and not hasattr(plain, "gain")


def test_a_row_of_another_width_restores_to_the_fill_and_keep_newer_keeps_the_later_clock():
    t = make()
    (a,) = t.slots_for(["a"], [0], now=100.0)
    snap = t.snapshot(a)
    snap.columns["blend_w"] = np.array([0.5, 0.5, 0.5])  # three values where two are declared
    snap.columns["interval_log_m"] = np.float64(0.25)  # one value where two are declared
    snap.columns["n_seen"] = np.array([3, 4])  # two values where one is declared
    snap.last_seen = 50.0
    other = make()
    other.slots_for(["x"], [0], now=80.0)
    slot = other.restore(snap)
    assert other.blend_w[slot].tolist() == [1.0, 1.0] and other.interval_log_m[slot].tolist() == [0.0, 0.0]
    assert other.n_seen[slot] == 0
    assert other.last_seen[slot] == 50.0  # a new slot: the snapshot's
    other.last_seen[slot] = 120.0
    other.restore(snap)  # the table's clock has moved on: kept
    assert other.last_seen[slot] == 120.0


_GROWTH_RSS = """
import os
from stream_lstm.state.table import DeviceTable

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

n = 60_000
ids = [f"dev-{d}" for d in range(n)]
start = rss()
table = DeviceTable(n, 64, 1, 1, 64, initial_capacity=1024)
table.ensure_horizon(12)
for lo in range(0, n, 2000):
    table.slots_for(ids[lo:lo + 2000], [0] * len(ids[lo:lo + 2000]), now=0.0)
arrays = (table.h.numel() + table.c.numel()) * 4 + table.window.data.nbytes + table.experts.nbytes
arrays += sum(getattr(table, c.name).nbytes for c in table.columns)
print((rss() - start) / n, arrays / n)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_growth_gives_the_replaced_arrays_back_to_the_os():
    # In a fresh interpreter (a clean heap): a table grown by doubling from 1,024 slots to 60k
    # devices holds little more than its arrays. Without malloc_trim after each growth, glibc
    # kept the replaced arrays in its heap: ~640 B a device more (docs/benchmarks.md). What is
    # not arrays (the ids, the index, the interpreter) ran 390-405 B a device: 500 B tells the two.
    out = subprocess.run([sys.executable, "-c", _GROWTH_RSS], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    per_device, arrays = map(float, out.stdout.split())
    assert per_device < arrays + 500, (per_device, arrays)


def test_a_batch_of_new_devices_in_reused_slots_starts_fresh_or_from_its_snapshot():
    """slots_for clears a batch's new devices together (not one by one): every reused slot
    forgets the device before it, each new device gets its partition, and one that the store
    holds is restored over its cleared slot, in the same batch as the others and a repeat."""
    t = make(max_devices=4, with_experts=True)
    old = t.slots_for(["a", "b", "c"], [0, 1, 2], now=1.0)
    kept_snap = None
    for slot in old.tolist():  # state to forget
        t.h[:, slot], t.c[:, slot] = 5.0, 6.0
        t.norm.update(np.array([slot]), np.array([[9.0]]))
        t.window.push(np.array([slot]), np.array([[3.0]], np.float32))
        t.n_seen[slot], t.blend_w[slot], t.model_version[slot] = 40, 0.25, "v1"
        t.experts[slot] += 1.0
    kept_snap = t.snapshot(int(old[2]))
    kept_snap.device_id = "z"  # a device the store holds
    t.drop(["a", "b", "c"])
    fresh = make(max_devices=4, with_experts=True)
    blank = fresh.snapshot(int(fresh.slots_for(["q"], [0], now=0.0)[0]))
    got = t.slots_for(["x", "y", "x", "z"], [3, 1, 3, 2], now=2.0,
                      load=lambda dev: kept_snap if dev == "z" else None)
    assert got[0] == got[2] and len(set(got.tolist())) == 3 and set(got.tolist()) <= set(old.tolist()) | {3}
    for dev, part in (("x", 3), ("y", 1)):
        slot = t.index[dev]
        snap = t.snapshot(slot)
        assert torch.all(t.h[:, slot] == 0) and torch.all(t.c[:, slot] == 0)
        assert snap.count == 0 and snap.window.size == 0 and t.model_version[slot] == ""
        assert int(t.partition[slot]) == part and t.last_seen[slot] == 2.0
        assert np.array_equal(t.experts[slot], fresh.experts[fresh.index["q"]], equal_nan=True)
        for col in t.columns:
            if col.name not in ("partition", "last_seen"):
                np.testing.assert_array_equal(getattr(t, col.name)[slot], getattr(fresh, col.name)[fresh.index["q"]])
        assert snap.columns.keys() - {"partition", "last_seen"} == blank.columns.keys() - {"partition", "last_seen"}
    z = t.index["z"]
    assert torch.all(t.h[:, z] == 5.0) and t.n_seen[z] == 40 and t.blend_w[z].tolist() == [0.25, 0.25]
    assert t.model_version[z] == "v1" and int(t.partition[z]) == 2
