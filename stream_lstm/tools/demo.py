"""``stream-lstm up``: the whole job on one machine, end to end, with live forecasts.

It uses the broker ``STREAM_LSTM_BOOTSTRAP_SERVERS`` points at when one answers, else starts
a fresh local Apache Kafka broker for the run, creates the topics, starts the worker as its
own process, feeds it a simulated fleet (or replays the CSV recordings you name), and
prints forecasts as they arrive on the output topic. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from stream_lstm.config import Settings, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run everything locally: a Kafka broker (from Maven jars), the worker, and a simulated "
        "fleet (or a replay of real CSV recordings), and show live forecasts. Ctrl-C stops it."
    )
    parser.add_argument("csv", nargs="*", type=Path,
                        help="CSV recordings to replay instead of simulating a fleet")
    parser.add_argument("--devices", type=int, default=20, help="simulated devices (default 20)")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="readings per second, all devices together (default 40)")
    parser.add_argument("--speedup", type=float, default=3600.0,
                        help="replay speed-up of a CSV's own timing (default 3600)")
    parser.add_argument("--port", type=int, default=9092, help="local broker port (default 9092)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--keep-broker", action="store_true",
                        help="leave the broker running afterwards")


def ensure_broker(settings: Settings, port: int) -> tuple[str, object | None]:
    """The broker the settings point at if it answers, else a local one on ``port``."""
    from stream_lstm.kafka.clients import make_admin

    try:
        make_admin(settings, request_timeout_ms=3000).close()
        return settings.bootstrap_servers, None
    except Exception:  # noqa: BLE001 - nothing there: start our own
        pass
    import tempfile

    from stream_lstm.kafka.local_broker import LocalBroker

    # A fresh broker each run: the fleet's event times restart about 30 days back, so the state
    # a previous run left in a kept broker would be ahead of them, and every reading late.
    broker = LocalBroker(port=port, data_dir=tempfile.mkdtemp(prefix="stream-lstm-up-"))
    print(f"starting a local Kafka broker on 127.0.0.1:{port} (first run fetches jars with mvn)")
    broker.start()
    return broker.bootstrap, broker


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    bootstrap, broker = ensure_broker(settings, args.port)
    settings = settings.model_copy(update={"bootstrap_servers": bootstrap})
    from stream_lstm.startup import ensure_worker_topics

    ensure_worker_topics(settings)
    env = dict(os.environ, STREAM_LSTM_BOOTSTRAP_SERVERS=bootstrap)
    # The demo starts from an untrained model; retraining in the background shows a promotion
    # and a hot-swap within minutes (override with the variable itself).
    env.setdefault("STREAM_LSTM_RETRAIN_EVERY_READINGS", "5000")
    exe = [sys.executable, "-m", "stream_lstm.cli"]
    children = [subprocess.Popen(exe + ["run"], env=env)]
    if args.csv:
        feed = exe + ["replay", *map(str, args.csv), "--speedup", str(args.speedup)]
    else:
        feed = exe + ["simulate", "--devices", str(args.devices), "--rate", str(args.rate)]
    children.append(subprocess.Popen(feed, env=env, stderr=subprocess.DEVNULL))
    print(f"broker {bootstrap} | worker pid {children[0].pid} | feeding "
          f"{'replay of ' + ', '.join(map(str, args.csv)) if args.csv else f'{args.devices} simulated devices'}"
          f" | metrics http://{settings.metrics_host}:{settings.metrics_port}/metrics")
    print("live forecasts (Ctrl-C to stop):")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        show_forecasts(settings, args.duration, stop, children[0])
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        if broker is not None and not args.keep_broker:
            broker.stop()  # type: ignore[attr-defined]
            shutil.rmtree(broker.data_dir, ignore_errors=True)  # type: ignore[attr-defined]
            print("local broker stopped")
        elif broker is not None:
            print(f"local broker left running: stream-lstm kafka down --port {args.port} "
                  f"--data-dir {broker.data_dir}")  # type: ignore[attr-defined]
    return 0


def show_forecasts(settings: Settings, duration: float, stop: dict,
                   worker: subprocess.Popen) -> None:
    """Print forecasts from the output topic as they arrive (a few lines per second)."""
    from stream_lstm.kafka.clients import make_consumer

    consumer = make_consumer(settings, settings.output_topic,
                             group_id=f"stream-lstm-up-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="latest", isolation_level="read_committed")
    t_end = time.time() + duration if duration else float("inf")
    shown_at, seen, anomalies, t_status = 0.0, 0, 0, time.time()
    print(f"{'time (UTC)':19}  {'device':14} {'now':>9}  {'next 3 steps (90% interval)':44} score")
    while time.time() < t_end and not stop["now"]:
        if worker.poll() is not None:
            print(f"the worker exited with code {worker.returncode}; see its log above")
            break
        for recs in consumer.poll(timeout_ms=500).values():
            for rec in recs:
                seen += 1
                f = json.loads(rec.value)
                anomalies += bool(f.get("is_anomaly"))
                if time.time() - shown_at > 0.25 or f.get("is_anomaly"):
                    shown_at = time.time()
                    print(format_forecast(f), flush=True)
        if time.time() - t_status > 5:
            t_status = time.time()
            print(f"-- {seen} forecasts received, {anomalies} anomalies flagged --", flush=True)
    consumer.close()


def format_forecast(f: dict) -> str:
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f["ts"]))
    steps = " ".join(
        f"{m:.1f}[{lo:.1f},{hi:.1f}]" for m, lo, hi in
        zip(f["forecast"][:3], f["lower"][:3], f["upper"][:3], strict=False)
    )
    score = f.get("anomaly_score")
    flag = " ANOMALY" if f.get("is_anomaly") else ""
    return (f"{ts}  {f['device_id'][:14]:14} {f['value']:9.2f}  {steps:44} "
            f"{'-' if score is None else f'{score:.1f}'}{flag}")
