"""What the in-process benchmarks share (tools/bench/fixture.py): a pipeline over a fleet that
forecasts each device's readings, the fleet's readings step by step, the rate of feeding them
in batches, and the spec of the fixture's model."""

import json
import time

from stream_lstm.tools.bench.fixture import pipeline_fixture, rate, say, spec


def test_the_fleets_readings_are_one_a_device_a_minute_apart():
    _, _, _, _, _, records = pipeline_fixture(6)
    first, second = records(0), records(1)
    assert [r.key for r in first] == [f"dev-{d}".encode() for d in range(6)]
    assert [r.partition for r in first] == [0, 1, 2, 3, 0, 1] and [r.offset for r in first] == list(range(6))
    a, b = json.loads(first[2].value), json.loads(second[2].value)
    assert a["device_id"] == "dev-2" and b["ts"] - a["ts"] == 60.0
    assert a["ts"] < 1e10 and a["value"] != b["value"]  # seconds; the level moves


def test_the_pipeline_forecasts_every_device_and_keeps_its_state():
    s, table, model, engine, pipe, records = pipeline_fixture(8)
    assert s.max_devices == 8 and s.min_history == 1 and table.capacity == 8
    out = pipe.handle(records(0), time.time())
    counts = out.counts
    assert counts.consumed == 8 and counts.dlq == 0 and counts.forecasts + counts.warmup == 8
    assert pipe.handle(records(1), time.time()).counts.forecasts == 8
    assert sorted(table.index) == sorted(f"dev-{d}" for d in range(8))
    assert (table.n_seen[[table.index[f"dev-{d}"] for d in range(8)]] == 2).all()
    assert engine.model is model


def test_rate_feeds_every_step_in_batches_and_measures_readings_per_second():
    _, table, _, _, pipe, records = pipeline_fixture(10)
    per_s = rate(pipe, records, range(3), batch=4)  # 10 devices in batches of 4, 4, 2
    assert per_s > 0
    assert (table.n_seen[[table.index[f"dev-{d}"] for d in range(10)]] == 3).all()


def test_settings_reach_the_pipeline_and_the_spec_is_the_models():
    s, table, model, _, _, _ = pipeline_fixture(4, forecast_stages="", horizon=5)
    assert s.stage_names == () and table.experts.nbytes == 0  # no experts stage: no expert state
    assert model.horizon == 5
    m = spec(s)
    assert (m.n_features, m.hidden_size, m.num_layers, m.horizon) == (1, model.hidden_size, 1, 5)
    _, with_experts, *_ = pipeline_fixture(4, forecast_stages="experts")
    assert with_experts.experts.nbytes > 0


def test_the_callers_min_history_wins():
    s, _, _, _, pipe, records = pipeline_fixture(3, min_history=2)
    assert s.min_history == 2
    counts = pipe.handle(records(0), time.time()).counts
    assert (counts.forecasts, counts.warmup) == (0, 3)  # one reading each: still warming up
    assert pipe.handle(records(1), time.time()).counts.forecasts == 3


def test_say_writes_one_line_to_stderr(capsys):
    say("engine: 10 devices")
    assert capsys.readouterr() == ("", "engine: 10 devices\n")
