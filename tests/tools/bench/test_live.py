"""The live benchmark's roles and one short measurement each way (tools/bench_live.py)."""

import pytest

from stream_lstm.tools.bench.live import _run_one

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(400)]


@pytest.mark.parametrize(("kind", "guarantee"), [("relay", "exactly_once"), ("worker", "exactly_once"),
                                               ("worker", "at_least_once")])
def test_a_short_paced_load_is_seen_through_and_measured(settings_factory, kind, guarantee):
    row = _run_one(settings_factory(processing_guarantee=guarantee), kind, rate=100, seconds=3)
    assert row["readings"] == 300  # every reading came out, read_committed
    assert row["cpu_ms_per_reading"] > 0
    assert 0 < row["p50_ms"] <= row["p99_ms"] < 60_000
    # The fleet's first readings went through first, measured apart (one a device: 300 of them)
    assert row["first_readings"] == 300 and 0 < row["first_p99_ms"] < 60_000


def test_a_reader_that_gets_no_partitions_says_so_instead_of_hanging(settings_factory, topic_name,
                                                                     monkeypatch, capsys):
    # Once seen: a reader whose consumer spun on its group coordinator held `bench` for 15
    # minutes. Readers join no group now (every partition assigned by hand), and the wait for a
    # topic's partitions is bounded.
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics
    from stream_lstm.tools.bench import live

    s = settings_factory()
    ensure_topics(s, [TopicSpec(topic_name, 3)])
    reader = live.assigned_reader(s, topic_name, from_end=True)
    try:
        assert reader.config["group_id"] is None and {tp.partition for tp in reader.assignment()} == {0, 1, 2}
    finally:
        reader.close()
    monkeypatch.setattr(live, "READER_JOIN_S", 1.0)
    live.read(s, f"{topic_name}-never-created", expect=1)
    assert capsys.readouterr().out.strip() == "no partitions"
