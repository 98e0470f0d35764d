"""``stream-lstm bench`` (tools/bench/cli.py): its arguments, that every benchmark it runs takes
the arguments it is given, and a ``--skip-kafka --quick`` run whose stdout is one JSON object
of the figures (human lines on stderr). The in-process fleet sizes are capped here (1k and
100k in a real run) so the run takes seconds; each benchmark has its own test module."""

import argparse
import inspect
import json

import pytest

from stream_lstm.tools.bench import cli

pytestmark = [pytest.mark.timeout(300)]


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_arguments():
    args = parse()
    assert (args.devices, args.messages, args.quick, args.skip_kafka) == (10_000, 200_000, False, False)
    args = parse("--devices", "50", "--messages", "1000", "--quick", "--skip-kafka")
    assert (args.devices, args.messages, args.quick, args.skip_kafka) == (50, 1000, True, True)
    with pytest.raises(SystemExit):
        parse("--devices", "many")


@pytest.mark.parametrize("bench", cli.BENCHMARKS + cli.IN_PROCESS, ids=lambda b: b.__name__)
def test_every_benchmark_takes_what_main_passes_it(bench):
    inspect.signature(bench).bind(None, "topic", 1000, {}, True)  # settings, topic, messages, result, quick


def test_a_quick_in_process_run_prints_one_json_object_of_its_figures(monkeypatch, capsys):
    real = cli.bench_scale
    sizes = []

    def smaller(devices, readings_per_device=3):
        sizes.append(devices)
        return real(min(devices, 300), readings_per_device)

    monkeypatch.setattr(cli, "bench_scale", smaller)
    backlog = cli.IN_PROCESS[0]
    assert backlog is cli.bench_backlog
    monkeypatch.setattr(cli, "IN_PROCESS", [lambda *a: backlog(*a, devices=2, readings=20)])
    assert cli.main(parse("--skip-kafka", "--quick", "--devices", "200")) == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()  # stdout is the JSON alone
    result = json.loads(line)
    assert sizes == [1_000, 100_000]
    assert result["quick"] is True and result["engine_devices"] == 200
    for key in ("engine_steps_per_s", "naive_steps_per_s", "batched_window_steps_per_s",
                "pipeline_inproc_msgs_per_s_1000", "pipeline_inproc_msgs_per_s_100000"):
        assert result[key] > 0, key
    assert result["rss_bytes_per_device"] == result["rss_bytes_per_device_100000"] >= 0
    assert result["speedup"] == pytest.approx(result["engine_steps_per_s"] / result["naive_steps_per_s"], rel=0.05)
    assert result["backlog_ratio"] > 0  # the in-process benchmarks run without a broker too
    assert "bare_consume_msgs_per_s" not in result  # --skip-kafka: no broker, no Kafka benchmarks
    assert "engine: 200 devices" in err and "pipeline in-process at 100,000 devices" in err


def test_a_bad_variable_is_one_line_before_any_figure(monkeypatch, capsys):
    """It was pydantic's traceback, after minutes of the figures that did not read it."""
    from stream_lstm.cli import main

    monkeypatch.setenv("STREAM_LSTM_HORIZON", "twelve")
    assert main(["bench", "--quick"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("bench: invalid setting STREAM_LSTM_HORIZON: Input should be a "
                                 "valid integer, unable to parse string as an integer\n")
