"""BatchPipeline pieces that need no broker: the alert events of devices forgotten by TTL, a
deep backlog through the fused path (one packed forward a poll) forecast as the step path does,
and the model version on forecasts and alert events after a hot swap."""

import json
from pathlib import Path

import numpy as np
import torch

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.encoding import encode_reading
from stream_lstm.engine import BatchedEngine
from stream_lstm.models import SimpleLSTM
from stream_lstm.pipeline import BatchPipeline
from stream_lstm.state.table import DeviceTable


def test_a_device_forgotten_by_ttl_closes_its_open_alert(tmp_path: Path):
    s = Settings(alerts_topic="alerts", device_ttl_s=60.0, state_dir=tmp_path)
    table = DeviceTable(4, 8, 1, 1, 8)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "v1")
    open_, _ = table.slots_for(["pump-1", "pump-2"], partitions=[3, 3], now=0.0)
    table.alert[open_] = [100.0, 160.0, 0.9999, 130.0, 42.0, 1.0, 2.0]
    table.last_ts[open_] = 170.0
    manager = StateManager(s, tmp_path / "state.sqlite")
    records = manager.expire(table, now=1000.0, farewell=pipe.farewell)
    changelog = [r for r in records if r[0] == manager.topic]
    closes = [r for r in records if r[0] == "alerts"]
    assert sorted(r[1] for r in changelog) == [b"pump-1", b"pump-2"]  # both forgotten
    assert all(r[2] is None for r in changelog)  # tombstones
    assert len(closes) == 1 and closes[0][1] == b"pump-1" and closes[0][4] is None
    event = json.loads(closes[0][2])
    assert (event["event"], event["reason"], event["alert_id"]) == ("close", "expired", "pump-1@100000")
    assert event["ts"] == 170.0 and event["peak_likelihood"] == 0.9999 and event["value"] == 42.0
    assert len(table) == 0
    manager.store.close(clean=True)


class Rec:
    def __init__(self, offset: int, device: str, ts: float, value: float) -> None:
        self.topic, self.partition, self.offset = "in", 0, offset
        self.key, self.value = device.encode(), encode_reading(device, ts, [value])


def backlog(seed: int = 0) -> list[list[Rec]]:
    """Polls of a 6-device backlog, 80 to 400 readings a poll (up to ~100 of one device):
    devices join mid-poll (one more each poll), a device now and then comes back after a gap
    (a reset), and a reading is sent twice now and then (a duplicate). pump-0's 150th reading is
    a glitch (1e11)."""
    rng = np.random.default_rng(seed)
    devices = [f"pump-{i}" for i in range(6)]
    clock, count = dict.fromkeys(devices, 1e9), dict.fromkeys(devices, 0)
    polls, offset = [], 0
    for p in range(8):
        recs = []
        for d in rng.choice(devices[: 1 + p], size=int(rng.integers(80, 400))).tolist():
            roll = rng.random()
            clock[d] += 3600.0 if roll < 0.01 else (0.0 if roll < 0.02 else 60.0)
            level = 20.0 + devices.index(d) + 3 * np.sin(clock[d] / 600) + rng.normal(0, 0.3)
            count[d] += 1
            if (d, count[d]) == ("pump-0", 150):
                level = 1e11
            recs.append(Rec(offset, d, clock[d], level + (15.0 if rng.random() < 0.005 else 0.0)))
            offset += 1
        polls.append(recs)
    return polls


def run_backlog(fuse_min_rounds: int) -> tuple[list[dict], DeviceTable, list[str]]:
    s = Settings(output_topic="forecasts", alerts_topic="alerts", max_gap_s=600.0, min_history=4)
    torch.manual_seed(0)
    model = SimpleLSTM(1, 16, 2, s.horizon)
    table = DeviceTable(16, s.window, 1, 2, 16, with_experts=True)
    engine = BatchedEngine(model, table, fuse_min_rounds=fuse_min_rounds)
    pipe = BatchPipeline(s, table, engine, lambda: "v1")
    published, paths = [], []
    for recs in backlog():
        out = pipe.handle(recs, now=2e9)
        paths.append(engine.last_path)
        published += [(topic, json.loads(value)) for topic, _, value, _ in out.records]
    return published, table, paths


def assert_close(got, want, where: str) -> None:
    if isinstance(want, float) or isinstance(got, float):
        assert got is not None and want is not None, where
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), f"{where}: {got} != {want}"
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_a_backlog_through_the_fused_path_publishes_what_the_step_path_does(monkeypatch):
    monkeypatch.setattr("stream_lstm.state.ingest.GLITCH_WARMUP", 100)  # (pump-0's glitch counts)
    (stepped, step_table, step_paths), (fused, fused_table, fused_paths) = run_backlog(10**9), run_backlog(1)
    assert set(step_paths) == {"step"} and set(fused_paths) == {"fused"}
    forecasts = [r for topic, r in stepped if topic == "forecasts"]
    # What the backlog covers: resets, scored readings, likelihoods past their warm-up.
    assert sum(r["reset"] for r in forecasts) >= 3
    assert sum(r["anomaly_likelihood"] is not None for r in forecasts) > 100
    assert [r["device_id"] for r in forecasts if r["value"] == 1e11] == ["pump-0"]
    assert len(fused) == len(stepped) > 1500
    for i, ((topic_f, f), (topic_s, s)) in enumerate(zip(fused, stepped, strict=True)):
        assert topic_f == topic_s and f.keys() == s.keys(), i
        for name in s:
            assert_close(f[name], s[name], f"record {i} ({s['device_id']}) {name}")
    # The device state afterwards: h/c, the normalizer, the window, every column, the experts.
    assert fused_table.index == step_table.index
    pairs = [(fused_table.h.numpy(), step_table.h.numpy(), "h"), (fused_table.c.numpy(), step_table.c.numpy(), "c"),
             (fused_table.experts, step_table.experts, "experts"), (fused_table.window.data, step_table.window.data, "window")]
    pairs += [(getattr(fused_table.norm, n), getattr(step_table.norm, n), n) for n in ("count", "mean", "var")]
    pairs += [(getattr(fused_table, c.name), getattr(step_table, c.name), c.name) for c in step_table.columns]
    for got, want, name in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=name)


def test_each_forecast_carries_the_version_of_the_model_its_device_stepped_under():
    """After a swap a device keeps its own version (its h/c's) until it is re-warmed; a new
    device starts under the served one."""
    s = Settings(output_topic="forecasts", min_history=1)
    table = DeviceTable(8, s.window, 1, 1, 8)
    engine = BatchedEngine(SimpleLSTM(1, 8, 1, s.horizon), table, version="v1")
    served = ["v1"]
    pipe = BatchPipeline(s, table, engine, lambda: served[0])
    pipe.handle([Rec(0, "old", 1e9, 20.0)], now=2e9)
    engine.swap_model(SimpleLSTM(1, 8, 1, s.horizon), "v2")
    served[0] = "v2"
    out = pipe.handle([Rec(1, "old", 1e9 + 60, 21.0), Rec(2, "new", 1e9 + 60, 5.0)], now=2e9)
    got = {f["device_id"]: f["model_version"] for f in (json.loads(r[2]) for r in out.records)}
    assert got == {"old": "v1", "new": "v2"} and engine.last_groups == 2


def test_an_offline_commands_stop_lost_where_it_was_raised_is_heard_at_the_next_batch(monkeypatch):
    """bench and evaluate run batches in-process: a stop signal whose KeyboardInterrupt C code
    cleared (signals.interrupt_now remembers it) ran on to the end, as `train` did before its
    training loop asked between chunks."""
    import pytest

    from stream_lstm import signals

    s = Settings(output_topic="forecasts", min_history=1)
    table = DeviceTable(8, s.window, 1, 1, 8)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, s.horizon), table, version="v1"), lambda: "v1")
    monkeypatch.setattr(signals, "_interrupted", False)
    assert len(pipe.handle([Rec(0, "a", 1e9, 20.0)], now=2e9).records) == 1
    monkeypatch.setattr(signals, "_interrupted", True)  # (a stop signal came, and was lost)
    with pytest.raises(KeyboardInterrupt):
        pipe.handle([Rec(1, "a", 1e9 + 60, 21.0)], now=2e9)


def test_an_alert_that_opens_after_a_swap_carries_its_devices_version():
    """An alert event is stamped like the forecast it rode on: the device's own model."""
    s = Settings(output_topic="forecasts", alerts_topic="alerts", min_history=1)
    table = DeviceTable(8, s.window, 1, 1, 8)
    engine = BatchedEngine(SimpleLSTM(1, 8, 1, s.horizon), table, version="v1")
    served = ["v1"]
    pipe = BatchPipeline(s, table, engine, lambda: served[0])
    rng = np.random.default_rng(3)
    for k in range(200):  # past the likelihood's warm-up, ordinary noise
        pipe.handle([Rec(k, "old", 1e9 + 60 * k, 20.0 + rng.normal(0, 0.1))], now=2e9)
    engine.swap_model(SimpleLSTM(1, 8, 1, s.horizon), "v2")
    served[0] = "v2"
    out = pipe.handle([Rec(200, "old", 1e9 + 60 * 200, 500.0)], now=2e9)  # far off: an alert opens
    events = [json.loads(r[2]) for r in out.records if r[0] == "alerts"]
    assert [(e["event"], e["model_version"]) for e in events] == [("open", "v1")]


def test_the_far_future_check_reads_the_records_timestamp_so_a_replay_decides_alike():
    # A device clock 310 s ahead (the limit is 300 s): sent to the DLQ live. Replayed after a
    # restart 20 s later, the worker's clock would have accepted it, and the device's later
    # readings would then have been dropped as late.
    from collections import namedtuple

    from stream_lstm.messages import ReadingDecoder
    from stream_lstm.pipeline import decode_records

    Record = namedtuple("Record", "topic partition offset key value timestamp")
    sent = 1_764_000_000.0
    ahead = Record("in", 0, 7, b"d", encode_reading("d", sent + 310.0, [1.0]), int(sent * 1000))
    decoder = ReadingDecoder(Settings())
    for now in (sent + 0.1, sent + 20.0):  # live, then the replay
        d = decode_records(decoder, [ahead], now)
        assert d.ids == [] and d.dead[0][1] == "ts_far_future"
    on_time = ahead._replace(value=encode_reading("d", sent + 200.0, [1.0]))
    assert decode_records(decoder, [on_time], now=sent - 500.0).ids == ["d"]  # the stamp, not now
    # No Kafka timestamp (0 or -1): dead-lettered on every pass, whatever the clock says (it was
    # checked against the worker's clock: dead-lettered live, taken in by a replay 130 s later).
    for stamp in (0, -1):
        for now in (sent + 0.1, sent + 400.0):
            d = decode_records(decoder, [ahead._replace(timestamp=stamp)], now)
            assert d.ids == [] and d.dead[0][1] == "no_record_time", (stamp, now)
    d = decode_records(decoder, [ahead._replace(timestamp=0, value=b"nope")], sent)
    assert d.dead[0][1] == "not_json"  # what is wrong with the reading itself comes first
    Bare = namedtuple("Bare", "topic partition offset key value")  # (the offline tools' records)
    assert decode_records(decoder, [Bare("in", 0, 7, b"d", on_time.value)], now=sent).ids == ["d"]


def test_the_drift_score_and_h_step_interval_mean_the_same_at_any_level():
    """The H-step forecasts a reading's drift score meets were kept in float32: a device at 5e11
    with a noise of 1 had them rounded by far more than its noise, and published drift scores
    of about 120 (a p-value of e^-120 on ordinary readings) and H-step intervals ~50x wider."""
    def medians(level: float) -> tuple[float, float]:
        s = Settings(output_topic="forecasts")
        torch.manual_seed(0)
        table = DeviceTable(4, s.window, 1, 1, 8, with_experts=True)
        pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, s.horizon), table), lambda: "v1")
        rng = np.random.default_rng(0)
        recs = [Rec(i, "m", 1e9 + 60 * i, level + rng.normal(0, 1.0)) for i in range(600)]
        out = [json.loads(v) for k in range(0, 600, 50)
               for topic, _, v, _ in pipe.handle(recs[k : k + 50], now=2e9).records
               if topic == "forecasts"][200:]
        return (float(np.median([f["drift_score"] for f in out if f.get("drift_score") is not None])),
                float(np.median([f["upper"][-1] - f["lower"][-1] for f in out])))

    (score_20, width_20), (score_big, width_big) = medians(20.0), medians(5e11)
    assert score_20 < 1.5 and score_big < 1.5  # |x - forecast| / b is about 1 either way
    assert width_big < 2 * width_20


def test_a_glitch_is_published_judged_and_alerted_but_spoils_no_later_forecast():
    """One reading of 1e11 on a device near 21 moved its normalizer's variance by ~1e22 and
    its forecasts were worthless for ~2,000 readings after. Its state now takes in the previous
    reading instead: every forecast from the glitch on is its twin's, whose sensor repeated the
    previous reading; the glitch itself is published as it came, flagged, and opens an alert."""
    s = Settings(output_topic="forecasts", alerts_topic="alerts", min_history=4)
    torch.manual_seed(0)
    table = DeviceTable(4, s.window, 1, 1, 16, with_experts=True)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 16, 1, s.horizon), table), lambda: "v1")
    rng = np.random.default_rng(1)
    values = 21.0 + np.sin(np.arange(1300) / 7) + rng.normal(0.0, 0.1, 1300)
    twin = values.copy()
    values[1100], twin[1100] = 1e11, twin[1099]
    recs = [Rec(2 * i + k, device, 1e9 + 60.0 * i, float(v)) for i in range(1300)
            for k, (device, v) in enumerate((("glitchy", values[i]), ("twin", twin[i])))]
    published = []
    for i in range(0, len(recs), 200):
        published += [(topic, json.loads(value)) for topic, _, value, _ in pipe.handle(recs[i : i + 200], now=2e9).records]
    g, t = ([r for topic, r in published if topic == "forecasts" and r["device_id"] == d] for d in ("glitchy", "twin"))
    at = next(j for j, r in enumerate(g) if r["value"] == 1e11)
    assert g[at]["is_anomaly"] and g[at]["anomaly_likelihood"] >= 1 - 1e-7 and not t[at]["is_anomaly"]
    assert g[at]["residual"] > 1e10 and g[at]["anomaly_score"] > 1e6
    for j in range(at, len(t)):
        for name in ("forecast", "lower", "upper", *(("residual", "anomaly_score", "drift_score") if j > at else ())):
            assert_close(g[j][name], t[j][name], f"reading {j} {name}")
    # (the likelihood did not learn from the glitch, the twin's from its reading: close, not equal)
    assert sum(r["is_anomaly"] for r in g[at + 1 :]) == sum(r["is_anomaly"] for r in t[at + 1 :])
    opened = [r for topic, r in published if topic == "alerts" and r["event"] == "open"]
    assert [(r["device_id"], r["value"]) for r in opened if r["device_id"] == "glitchy"][:1] == [("glitchy", 1e11)]


def test_a_late_dead_letter_says_the_last_applied_ts_and_quotes_a_long_device_id_short():
    s = Settings(late_policy="dlq", window=8, hidden_size=4, max_message_bytes=4096)
    table = DeviceTable(4, 8, 1, 1, 4)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 4, 1, s.horizon), table), lambda: "v1")
    dev = "x" * 128
    out = pipe.handle([Rec(0, dev, 1_000.0, 1.0), Rec(1, dev, 500.0, 2.0)], now=2_000.0)
    (late,) = [dict(r[3]) for r in out.records if r[0] == s.dlq_topic]
    reason = late["error.reason"].decode()
    assert late["error.code"] == b"late" and "1000.0" in reason and len(reason) < 120, reason
