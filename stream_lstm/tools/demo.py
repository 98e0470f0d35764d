"""``stream-lstm up``: the whole job on one machine, end to end, with live forecasts.

It uses the broker ``STREAM_LSTM_BOOTSTRAP_SERVERS`` points at (and refuses to start when none
answers there: a mistyped address is said, not replaced), else starts a fresh local Apache
Kafka broker for the run, creates the topics, starts the worker as its own process, feeds it a
simulated fleet (or replays the CSV recordings you name), and prints forecasts as they arrive
on the output topic. Ctrl-C stops everything it started.

Each run has its own directory (``stream-lstm-up-*`` in the temporary directory): the local
broker's data, the worker's model registry and state store (unless ``STREAM_LSTM_MODEL_DIR`` /
``STREAM_LSTM_STATE_DIR`` say otherwise) and the logs of the worker (its JSON lines, in full)
and of the simulator. It is removed at the end, unless ``--keep-broker``. The terminal shows a
short line for the worker's start-up, warnings, errors and model promotions instead.

The children run in their own sessions, so the terminal's Ctrl-C reaches ``up`` alone: ``up``
then stops each (SIGTERM, then SIGKILL after a grace period or on a second Ctrl-C) and says
what it stopped. SIGTERM to ``up`` does the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from stream_lstm.config import ENV_PREFIX, Settings, SettingsError, load_settings
from stream_lstm.kafka.local_broker import tcp_port
from stream_lstm.tools import finite_float
from stream_lstm.tools.children import (
    Child,
    StopSignals,
    say,
    start_child,
    stop_children,
)
from stream_lstm.tools.live_table import show_forecasts, tail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run everything locally: a Kafka broker (from Maven jars), the worker, and a simulated "
        "fleet (or a replay of real CSV recordings), and show live forecasts. Ctrl-C stops it. "
        "With STREAM_LSTM_BOOTSTRAP_SERVERS set, it runs on that broker instead (--port is not "
        "used; none answering there is an error), on topics and a consumer group of the run's "
        "own (<topic>-up-<run>), deleted at the end unless --keep-broker. Exit code 0 after a stop; the worker's own code (or 1) "
        "when the worker exited by itself; 2 for a setting or a CSV it refuses."
    )
    parser.add_argument("csv", nargs="*", type=Path,
                        help="CSV recordings to replay instead of simulating a fleet")
    parser.add_argument("--devices", type=int, default=20, help="simulated devices (default 20)")
    parser.add_argument("--rate", type=finite_float, default=40.0,
                        help="readings per second, all devices together (default 40)")
    parser.add_argument("--speedup", type=finite_float, default=3600.0,
                        help="replay speed-up of a CSV's own timing (default 3600)")
    parser.add_argument("--port", type=tcp_port, default=9092,
                        help="local broker port (default 9092; not used with STREAM_LSTM_BOOTSTRAP_SERVERS)")
    parser.add_argument("--duration", type=finite_float, default=0.0,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--keep-broker", action="store_true",
                        help="leave the broker running afterwards, and keep the run's directory "
                             "(and, on your broker, the run's topics)")


def ensure_broker(settings: Settings, port: int, data_dir: str | Path | None = None,
                  use_existing: bool = True) -> tuple[str, object | None]:
    """A fresh local broker on ``port`` (its data in ``data_dir``, default a new temporary
    directory); with ``use_existing``, the broker the settings name instead if it answers.

    ``up`` passes ``use_existing`` only when ``STREAM_LSTM_BOOTSTRAP_SERVERS`` was set: probing
    the default address found the broker a ``stream-lstm kafka up`` had left on 9092, whose
    state from earlier runs made every reading late (0 forecasts, and nothing said why).
    """
    from stream_lstm.kafka.local_broker import LocalBroker, broker_answers, port_in_use

    if use_existing:
        if broker_answers(settings):
            return settings.bootstrap_servers, None
        # (a local demo in place of the broker you named would hide the mistyped address)
        raise SettingsError(f"no broker answers at {settings.bootstrap_servers} "
                            "(STREAM_LSTM_BOOTSTRAP_SERVERS): check the address, or unset it for a "
                            "local broker of this run's own")
    if port_in_use(port):
        raise SettingsError(f"port {port} is in use (a broker left by `stream-lstm kafka up`?): pass "
                            f"--port N for a fresh broker, or STREAM_LSTM_BOOTSTRAP_SERVERS=127.0.0.1:{port} "
                            "to run on that one")
    # A fresh broker each run: the fleet's event times restart about 30 days back, so the state
    # a previous run left in a kept broker would be ahead of them, and every reading late.
    broker = LocalBroker(port=port, data_dir=data_dir or tempfile.mkdtemp(prefix="stream-lstm-up-"))
    say(f"starting a local Kafka broker on 127.0.0.1:{port} (first run fetches jars with mvn)")
    broker.start()
    return broker.bootstrap, broker


def summarize_log_line(line: str) -> str | None:
    """The short human form of one of the worker's JSON log lines, or ``None`` to show nothing.

    Shown: the start-up line, warnings and errors, and the model's life (retraining, the
    promotion gate's decision, hot-swaps). Everything else stays in the log file only.

    >>> summarize_log_line('{"level": "info", "event": "model swapped", "from": "v1", "to": "v2"}')
    'worker: model swapped: now serving v2 (was v1)'
    >>> summarize_log_line('{"level": "info", "event": "partitions assigned"}') is None
    True
    """
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    event, level = str(rec.get("event", "")), str(rec.get("level", ""))
    if event.startswith("stream-lstm started"):
        c = rec.get("connected") or {}
        return (f"worker: broker {c.get('bootstrap_servers')} | {c.get('input_topic')} -> "
                f"{c.get('output_topic')} | {c.get('compute_device')} | model "
                f"{c.get('model_version')} | metrics {c.get('metrics')}")
    if event == "retraining started":
        return (f"worker: retraining a challenger to {rec.get('champion')} on "
                f"{rec.get('devices')} devices (in the background)")
    if event.startswith("promotion gate:"):
        def num(key: str) -> str:
            value = rec.get(key)
            return f"{value:.4g}" if isinstance(value, (int, float)) else "?"
        return (f"worker: {event} (challenger error {num('challenger_error')} vs champion "
                f"{num('champion_error')}, {num('seconds')} s)")
    if event == "model swapped":
        return f"worker: model swapped: now serving {rec.get('to')} (was {rec.get('from')})"
    if level in ("warning", "error", "critical"):
        skip = {"ts", "level", "logger", "event", "exception", "stack", "settings", "connected"}
        context = ", ".join(f"{k}={v}" for k, v in rec.items() if k not in skip)
        text = f"worker {level}: {event}" + (f" ({context})" if context else "")
        if rec.get("exception"):
            text += f" [{str(rec['exception']).strip().splitlines()[-1]}]"
        return text if len(text) <= 240 else text[:237] + "..."
    return None


class WorkerLogRelay(threading.Thread):
    """Copies the worker's output (JSON lines) to its log file and prints their short form.

    Parameters
    ----------
    stream
        The worker's stdout/stderr, read to its end.
    path
        The log file, appended to.
    show
        Told the short form of each line worth showing (:func:`summarize_log_line`).

    Examples
    --------
    >>> import io
    >>> out = io.BytesIO(b'{"level": "info", "event": "model swapped", "from": "v1", "to": "v2"}\\n'
    ...                  b'{"level": "info", "event": "worker stopped", "forecasts": 42}\\n')
    >>> with tempfile.TemporaryDirectory() as d:
    ...     relay = WorkerLogRelay(out, Path(d) / "worker.log", show=print)
    ...     relay.run()  # start() runs it in its own thread
    ...     kept = len((Path(d) / "worker.log").read_bytes().splitlines())
    worker: model swapped: now serving v2 (was v1)
    >>> kept, relay.stopped["forecasts"]
    (2, 42)
    """

    def __init__(self, stream: IO[bytes], path: Path, show: Callable[[str], None] = say) -> None:
        super().__init__(name="stream-lstm-up-worker-log", daemon=True)
        self.stream, self.path, self.show = stream, path, show
        self.stopped: dict | None = None  # the worker's own "worker stopped" line

    def run(self) -> None:
        with open(self.path, "ab") as out:
            for raw in iter(self.stream.readline, b""):
                out.write(raw)
                out.flush()
                line = raw.decode(errors="replace").strip()
                if line.startswith("{") and '"worker stopped"' in line:
                    with contextlib.suppress(ValueError):
                        self.stopped = json.loads(line)
                short = summarize_log_line(line)
                if short:
                    self.show(short)


def _env_has(name: str) -> bool:
    return any(k.upper() == name for k in os.environ)  # settings read names case-insensitively


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    if min(args.devices, args.rate, args.speedup) <= 0:  # before any broker starts
        raise SettingsError("--devices, --rate and --speedup must be positive")
    if args.csv:  # before any broker starts: a mistyped path is one line, not a silent run
        from stream_lstm.recordings import RecordingError, load_csv

        for path in args.csv:
            try:
                load_csv(path)
            except RecordingError as exc:
                raise SettingsError(str(exc)) from None
    run_dir = Path(tempfile.mkdtemp(prefix="stream-lstm-up-"))
    env = dict(os.environ)
    # Models and state are this run's own, next to the broker's data, unless the user says so.
    for name, sub in (("MODEL_DIR", "models"), ("STATE_DIR", "state")):
        if not _env_has(ENV_PREFIX + name):
            env[ENV_PREFIX + name] = str(run_dir / sub)
    # The demo starts from an untrained model; retraining in the background shows a promotion
    # and a hot-swap within minutes (override with the variable itself).
    env.setdefault(ENV_PREFIX + "RETRAIN_EVERY_READINGS", "5000")
    # Its /metrics on a free port, unless you name one: 9108 may be another worker's (a second
    # `up`, a worker of yours), and the worker would refuse to start.
    if not _env_has(ENV_PREFIX + "METRICS_PORT"):
        from stream_lstm.kafka.local_broker import free_port

        env[ENV_PREFIX + "METRICS_PORT"] = str(free_port())
    run: dict[str, Any] = {"children": [], "broker": None, "relay": None, "worker_exited": False,
                           "exited": None, "own_topics": [], "settings": settings}
    with StopSignals() as signals:
        try:
            _run(args, settings, env, run_dir, run, signals)
        except KeyboardInterrupt:  # a signal while setting up: clean up what there is, quietly
            run["interrupted"] = True
        finally:
            signals.raising = False
            _stop_all(args, run_dir, run, signals)
    # A worker or a feed that exited by itself: its code (a script running `up` must not read
    # that as success); one killed by a signal as a shell says it (-9: 137).
    if run["exited"] is None:
        return 0
    code = run["exited"].returncode
    return 128 - code if code < 0 else code or 1


def _run(args: argparse.Namespace, settings: Settings, env: dict[str, str], run_dir: Path,
         run: dict[str, Any], signals: StopSignals) -> None:
    say(f"this run's directory: {run_dir} (broker data, models, state, logs; "
        f"{'kept' if args.keep_broker else 'removed'} at the end)")
    chosen = _env_has(ENV_PREFIX + "BOOTSTRAP_SERVERS")
    bootstrap, run["broker"] = ensure_broker(settings, args.port, run_dir / "broker", use_existing=chosen)
    settings = settings.model_copy(update={"bootstrap_servers": bootstrap})
    env[ENV_PREFIX + "BOOTSTRAP_SERVERS"] = bootstrap
    if run["broker"] is None:
        # Your broker may hold an earlier run's readings and state: replayed first, they would
        # make this run's every reading late or a duplicate. The run gets topics and a group
        # of its own (its changelog follows the group).
        tag = f"up-{run_dir.name.rsplit('-', 1)[-1]}"
        # (the changelog too when it is named: derived from the group, it follows it; named, it
        # would be your worker's own, and the run deletes its topics at the end; the models
        # topic too: under TRAINER=external the run served your trainer's model)
        own = {k: f"{getattr(settings, k)}-{tag}" for k in ("input_topic", "output_topic", "dlq_topic",
                                                              "alerts_topic", "changelog_topic", "models_topic",
                                                              "group_id")
               if getattr(settings, k)}
        settings = settings.model_copy(update=own)
        run["settings"] = settings
        run["own_topics"] = list(dict.fromkeys(  # (a named changelog is among them already)
            [v for k, v in own.items() if k != "group_id"] + [settings.changelog_topic_name()]))
        env.update({ENV_PREFIX + k.upper(): v for k, v in own.items()})
        say(f"using your broker at {bootstrap} (STREAM_LSTM_BOOTSTRAP_SERVERS), with topics and a "
            f"consumer group of this run's own: {settings.input_topic} -> {settings.output_topic}")
    from stream_lstm.kafka.topics import ensure_worker_topics

    ensure_worker_topics(settings)
    exe = [sys.executable, "-m", "stream_lstm.cli"]
    if args.csv:
        feed = exe + ["replay", *map(str, args.csv), "--speedup", str(args.speedup)]
    else:
        feed = exe + ["simulate", "--devices", str(args.devices), "--rate", str(args.rate)]
    worker_log, feed_log = run_dir / "worker.log", run_dir / ("replay.log" if args.csv else "simulator.log")
    signals.raising = False  # from here a signal only asks to stop: no child is half-recorded
    if signals.stop:
        return
    worker = start_child("worker", exe + ["run"], env, worker_log,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run["children"].append(worker)
    relay = run["relay"] = WorkerLogRelay(worker.proc.stdout, worker_log)  # type: ignore[arg-type]
    relay.start()
    with open(feed_log, "ab") as out:
        run["children"].append(start_child("replay" if args.csv else "simulator", feed, env, feed_log,
                                           stdout=out, stderr=subprocess.STDOUT))
    say(f"broker {bootstrap} | worker pid {worker.proc.pid} (log: {worker_log}) | feeding "
        f"{'replay of ' + ', '.join(map(str, args.csv)) if args.csv else f'{args.devices} simulated devices'}")
    say("live forecasts (Ctrl-C to stop):")
    run["exited"] = show_forecasts(settings, args.duration, lambda: signals.stop, worker.proc,
                                   run["children"][-1].proc, feed_log)
    run["worker_exited"] = run["exited"] is worker.proc
    if run["worker_exited"]:
        relay.join(timeout=5)  # the log file has all the worker wrote
        say(f"the worker exited with code {worker.proc.returncode}; the end of its log "
            f"({worker_log}):\n{tail(worker_log)}")


def _stop_all(args: argparse.Namespace, run_dir: Path, run: dict[str, Any],
              signals: StopSignals) -> None:
    children: list[Child] = run["children"]
    if children:
        say("stopping ...")
    stop_children(children, signals)
    if run["relay"] is not None:
        run["relay"].join(timeout=5)
    parts = [describe(c, run["relay"]) for c in children]
    broker = run["broker"]
    if broker is None and (run_dir / "broker" / "broker.json").exists():
        from stream_lstm.kafka.local_broker import LocalBroker

        # A signal came while ensure_broker() was starting it: it may run all the same.
        broker = LocalBroker(args.port, run_dir / "broker")
        broker.pid = broker.running_pid()
        if broker.pid is None:
            broker = None
    if broker is not None and not args.keep_broker:
        pid = broker.pid
        broker.stop()
        parts.append(f"local broker (pid {pid})")
    # (without a signal, "stopped while starting up" read as if one had come, before the error)
    say(f"stopped: {', '.join(parts)}" if parts else
        ("stopped while starting up: " if run.get("interrupted") else "") + "nothing is left running")
    if run["own_topics"] and not args.keep_broker:
        from stream_lstm.kafka.topics import delete_leftovers

        try:  # (on your broker: a shared cluster must not collect a run's topics, nor its group)
            topics, groups = delete_leftovers(run["settings"], run["own_topics"], [run["settings"].group_id])
            if topics or groups:
                say(f"deleted this run's topics on your broker: {', '.join(topics) or 'none'}"
                    + (f" (and its consumer group {groups[0]})" if groups else ""))
        except Exception as exc:  # noqa: BLE001 - say what is left, never a traceback at the end
            say(f"could not delete this run's topics ({', '.join(run['own_topics'])}): {exc!r}"[:300])
    if broker is not None and args.keep_broker:
        from stream_lstm.kafka import broker_registry

        with contextlib.suppress(OSError):  # so a bare `stream-lstm kafka down` finds it too
            broker_registry.record(broker.port, broker.pid, broker.data_dir)
        say(f"kept: the local broker at {broker.bootstrap} (pid {broker.pid}; stop it with: "
            f"stream-lstm kafka down --port {broker.port} --data-dir {broker.data_dir}) and "
            f"this run's directory {run_dir} (models, state, logs)")
    elif args.keep_broker:
        say(f"kept: this run's directory {run_dir} (models, state, logs)")
    elif run["worker_exited"]:  # keep what explains the exit
        for item in run_dir.iterdir():
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            elif item.name != "worker.log":
                item.unlink(missing_ok=True)
        say(f"kept: the worker's log {run_dir / 'worker.log'} (the rest of {run_dir} is removed)")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        say(f"removed {run_dir}")


def describe(c: Child, relay: WorkerLogRelay | None) -> str:
    """e.g. ``worker (pid 123, 4,567 forecasts)`` or ``simulator (pid 124, sent 800 readings)``."""
    detail = ""
    if not c.stopped:
        detail = f", had exited with code {c.proc.returncode}"
    elif c.killed:
        detail = ", killed"
    elif c.name == "worker" and relay is not None and relay.stopped is not None:
        detail = f", {int(relay.stopped.get('forecasts') or 0):,} forecasts"
    elif c.log is not None:
        m = re.search(r"sent ([\d,]+) readings", tail(c.log, 5))
        if m:
            detail = f", sent {m.group(1)} readings"
    return f"{c.name} (pid {c.proc.pid}{detail})"
