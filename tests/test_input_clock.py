"""The input's own time, which the device TTL runs on (input_clock.py): a pause adds at most
the cap, bursts add their period once learnt, a backlog or a lagging worker what its records
span, producer clocks off by any amount at most the cap; a silent partition read to its end
moves with the whole input."""

import numpy as np

from stream_lstm.input_clock import InputClock


def idle(clock, partition, last_seen):
    return float(clock.idle(np.array([partition]), np.array([last_seen]))[0])


def test_a_pause_of_the_whole_input_adds_about_its_usual_gap():
    clock = InputClock(cap_s=150.0)
    for t in range(0, 101):  # a reading a second, read as written
        clock.saw({0: float(t)}, now=float(t))
    assert idle(clock, 0, 50.5) == 50.0  # 50 s of input since
    clock.saw({0: 5000.0}, now=5000.0)  # after a 4,900 s pause
    assert idle(clock, 0, 100.5) == 1.5  # the pause: 1.5 usual gaps, not 4,900 s
    assert idle(clock, 0, 5000.5) == 0.0
    for t in range(5001, 5011):
        clock.saw({0: float(t)}, now=float(t))
    clock.saw({0: 9000.0}, now=9000.0)  # a second pause soon after: one gap again, not a period
    assert idle(clock, 0, 100.5) == 1.5 + 10.0 + 1.5


def test_bursts_add_their_period_once_learnt():
    clock = InputClock(cap_s=22.5)  # a 90 s TTL, a fleet reporting together every 60 s
    gains = []
    for k in range(12):
        before = idle(clock, 0, -1.0)
        clock.saw({0: 60.0 * k}, now=60.0 * k + 1)
        gains.append(idle(clock, 0, -1.0) - before)
    assert gains[0] == 0.0 and gains[1] == 22.5 and all(0 < g <= 60.0 for g in gains[1:])
    assert gains[-4:] == [60.0] * 4  # learnt: a burst is its period of input time


def test_a_worker_reading_behind_moves_on_with_what_its_records_span():
    """The first fix never expired anything while a worker read more than half a TTL behind."""
    clock = InputClock(cap_s=15.0)
    for t in range(0, 200):  # records written 40 s before they are read, one a second
        clock.saw({0: float(t)}, now=t + 40.0)
    assert idle(clock, 0, 40.5) == 199.0 - 0.0  # seen in the first turn: 199 s of input since


def test_producer_clocks_off_move_it_at_most_the_cap_once():
    clock = InputClock(cap_s=15.0)
    for t in range(0, 50):
        clock.saw({0: float(t)}, now=float(t))
    clock.saw({0: 49.0 + 600}, now=50.0)  # a producer 600 s ahead: capped at the worker's now
    clock.saw({0: 51.0 - 600}, now=51.0)  # one 600 s behind: an older time moves nothing
    clock.saw({0: 52.0}, now=52.0)
    # 50 (1 s), 51 (nothing new), 52 (2 s since: counted up to 1.5 usual gaps): never more
    # than if all clocks were right
    assert idle(clock, 0, 49.5) == 2.5


def test_a_silent_partition_moves_with_the_whole_input_only_when_read_to_its_end():
    clock = InputClock(cap_s=15.0)
    clock.saw({0: 0.0, 1: 0.0, 2: 0.0}, now=0.0)
    clock.caught_up = {1}  # 1: nothing of it queued; 2: still reading a backlog
    for t in range(1, 101):
        clock.saw({0: float(t)}, now=float(t))
    assert [idle(clock, p, 0.5) for p in (0, 1, 2)] == [100.0, 100.0, 0.0]
    assert idle(clock, 3, 0.5) == 0.0  # never read: no time yet, nobody idle


def test_a_coarser_or_shorter_history_reads_as_less_idle_never_more():
    exact, coarse = InputClock(cap_s=15.0), InputClock(cap_s=15.0, resolution_s=10.0, max_points=8)
    for t in range(0, 300):
        exact.saw({0: float(t)}, now=float(t))
        coarse.saw({0: float(t)}, now=float(t))
    seen = np.arange(0.5, 300.0, 7.0)
    a, b = exact.idle(np.zeros(len(seen), int), seen), coarse.idle(np.zeros(len(seen), int), seen)
    assert (b <= a).all() and (a - b).max() > 0


def test_a_partition_assigned_again_starts_with_no_time():
    """A review: a partition resumed after a restore or a reassignment must not judge its
    devices (last seen before) by a history from before, or by the others' time."""
    clock = InputClock(cap_s=15.0)
    for t in range(0, 100):
        clock.saw({0: float(t), 1: float(t)}, now=float(t))
    clock.keep_only({0})  # 1 revoked ...
    for t in range(100, 200):
        clock.saw({0: float(t)}, now=float(t))
    assert idle(clock, 1, 50.5) == 0.0  # ... and assigned again: no time until it reads
    clock.saw({1: 500.0}, now=500.0)
    clock.saw({1: 510.0}, now=510.0)
    assert idle(clock, 1, 50.5) == 10.0 and idle(clock, 0, 50.5) > 100


def test_a_silent_partition_moved_with_the_input_does_not_count_its_silence_twice():
    """A review: a low-rate partition read to its end between its records moved with the
    whole input, then its next record's gap counted the same silence again: live devices of
    partitions reporting every 60 s were forgotten with a 90 s TTL."""
    clock = InputClock(cap_s=22.5)
    clock.saw({0: 0.0, 1: 0.0}, now=0.0)
    clock.caught_up = {1}
    for t in range(1, 31):
        clock.saw({0: float(t)}, now=float(t))
    assert idle(clock, 1, 0.5) == 30.0
    clock.saw({0: 31.0, 1: 31.0}, now=31.0)  # partition 1's next record, 31 s after its last
    assert idle(clock, 1, 0.5) == 31.0  # not 30 + 22.5


def test_a_long_ttl_keeps_the_whole_span_of_its_history():
    """A review: halving a full history by dropping its older half kept ~an hour of it, so with
    a TTL of two hours nothing was ever idle long enough to be forgotten."""
    ttl = 7200.0  # with a history of 64 points at ttl/16 (the worker: 4,096 at ttl/1024)
    clock = InputClock(cap_s=ttl / 4, resolution_s=ttl / 16, max_points=64)
    for t in range(0, 50_000, 5):
        clock.saw({0: float(t)}, now=float(t))
    assert idle(clock, 0, 1000.5) >= ttl  # merged points read as less idle, but past the TTL
    assert 995.0 - ttl / 16 <= idle(clock, 0, 49_000.5) <= 995.0  # the newer half: exact to a point


def test_a_burst_read_over_several_turns_is_learnt_as_its_period():
    """A review: a fleet's reports spread over a second are read over several turns, and an
    average of the gaps between turns learnt ~0.1 s, not the minute between bursts."""
    clock = InputClock(cap_s=22.5)
    for k in range(6):
        for j in range(10):  # ten turns 0.1 s apart, each with records written then
            t = 60.0 * k + 0.1 * j
            clock.saw({0: t}, now=t)
    before = idle(clock, 0, 240.95)  # after the fifth burst
    for j in range(10):
        clock.saw({0: 360.0 + 0.1 * j}, now=360.0 + 0.1 * j)
    assert idle(clock, 0, 240.95) - before == 60.0  # a burst: its period of input time


def test_a_wall_clock_stepping_back_does_not_age_the_devices_seen_after_it():
    clock = InputClock(cap_s=22.5)
    for t in range(0, 200):
        clock.saw({0: float(t)}, now=float(t))
    for t in range(80, 90):  # stepped back 120 s (NTP, a resumed VM): records written after
        clock.saw({0: 200.0 + t - 80}, now=float(t))
    assert idle(clock, 0, 89.5) == 0.0  # seen just now, by the new clock


def test_no_device_is_no_lookup():
    clock = InputClock(cap_s=15.0)
    clock.saw({0: 100.0}, now=100.0)
    assert clock.idle(np.zeros(0, np.int64), np.zeros(0)).shape == (0,)
