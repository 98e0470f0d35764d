"""``stream-lstm gpu-check`` (``make gpu-check``): what the CUDA path does, in one short run.

Made to be run on a lent GPU machine in a few minutes, with nothing but the repository and its
Python packages (issue 18). In order:

1. **continuity**: the same fleet through the in-process pipeline on the CPU and on the GPU,
   with the same weights: the largest difference of a forecast, in normalized units (goal
   ≤ 1e-4);
2. **engine**: one batched step of ``--devices`` devices (default 1M) with their state resident
   on the GPU: device-steps/s (goal ≥ 20M on an H100/H200);
3. **pipeline**: decode → state → engine → stages (experts included) → encode at 100k devices
   on the GPU, and the share of its time the engine takes: the rest is the CPU side (numpy
   experts, encoding) that limits a GPU worker;
4. **worker**: the worker through a local broker (exactly-once), when java and the Kafka jars
   are there (else says why not): in-process, then ``stream-lstm run`` with
   ``--worker-processes`` processes sharing the GPU over the same backlog (readings/s from the
   moment every process is ready, as ``bench``'s ``processes_ratio`` counts them).

The last line on stdout is one JSON object; ``--report`` writes a short Markdown report.
``--device cpu`` runs every step on the CPU (how CI checks the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream_lstm.tools import positive_int


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Check and measure the CUDA path: CPU/GPU continuity, the engine at 1M "
                          "devices, the pipeline's CPU share, the worker through Kafka. Prints one "
                          "JSON line; --report writes Markdown.")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default), or cpu to check the script")
    parser.add_argument("--devices", type=positive_int, default=1_000_000, help="engine fleet (default 1M)")
    parser.add_argument("--pipeline-devices", type=positive_int, default=100_000,
                        help="in-process pipeline fleet (default 100k)")
    parser.add_argument("--worker-readings", type=positive_int, default=60_000,
                        help="readings through the worker (default 60000)")
    parser.add_argument("--worker-devices", type=positive_int, default=4_000,
                        help="devices they come from (default 4000)")
    parser.add_argument("--worker-processes", type=positive_int, default=None,
                        help="processes sharing the device in the worker's second run (default: "
                             "the usable CPUs, at most 4; 1 leaves that run out)")
    parser.add_argument("--skip-kafka", action="store_true", help="leave out the worker through Kafka")
    parser.add_argument("--report", type=Path, default=None, help="write a Markdown report here")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _records(devices: int, readings: int, seed: int = 0) -> list:
    from stream_lstm.encoding import encode_reading
    from stream_lstm.tools.bench.core import Record

    rng = np.random.default_rng(seed)
    out, t0 = [], 1_700_000_000.0
    for k in range(readings):
        values = 50 + 10 * np.sin(k / 5 + np.arange(devices)) + rng.normal(size=devices)
        for d in range(devices):
            dev = f"d{d}"
            out.append(Record(d % 4, len(out), dev.encode(), encode_reading(dev, t0 + 60 * k, [float(values[d])])))
    return out


def _pipeline(device: Any, devices: int, seed: int = 0):
    import torch

    from stream_lstm.config import load_settings
    from stream_lstm.engine import BatchedEngine
    from stream_lstm.models import SimpleLSTM
    from stream_lstm.pipeline import BatchPipeline
    from stream_lstm.state.table import DeviceTable

    s = load_settings(max_devices=devices, min_history=1, window=64, hidden_size=64)
    torch.manual_seed(seed)
    model = SimpleLSTM(1, 64, 1, s.horizon)
    table = DeviceTable(devices, 64, 1, 1, 64, device=device, initial_capacity=min(devices, 4096),
                        with_experts="experts" in s.stage_names)
    return BatchPipeline(s, table, BatchedEngine(model, table), lambda: "check")


def check_continuity(device: Any, devices: int = 200, readings: int = 40) -> dict:
    """Largest forecast difference CPU against ``device``, in units of the interval's half-width."""
    import torch

    records = _records(devices, readings)
    forecasts = []
    for dev in (torch.device("cpu"), device):
        pipe = _pipeline(dev, devices)
        got = []
        for i in range(0, len(records), 500):
            out = pipe.handle(records[i : i + 500], time.time())
            got.extend(json.loads(v) for topic, _, v, _ in out.records if topic == pipe.settings.output_topic)
        forecasts.append(got)
    cpu, gpu = forecasts
    assert len(cpu) == len(gpu), (len(cpu), len(gpu))
    worst = 0.0
    for a, b in zip(cpu, gpu, strict=True):
        scale = max(1e-9, (a["upper"][0] - a["lower"][0]) / 2)  # q * b: the interval's half-width
        worst = max(worst, float(np.max(np.abs(np.array(a["forecast"]) - np.array(b["forecast"])))) / scale)
    return {"continuity_forecasts": len(cpu), "continuity_max_diff": worst,
            "continuity_ok": worst <= 1e-4}


def check_engine(device: Any, devices: int, repeats: int = 10) -> dict:
    import torch

    from stream_lstm.engine import BatchedEngine
    from stream_lstm.models import SimpleLSTM
    from stream_lstm.state.table import DeviceTable

    torch.manual_seed(0)
    table = DeviceTable(devices, 64, 1, 1, 64, device=device, initial_capacity=devices, with_experts=False)
    slots = table.slots_for([f"d{i}" for i in range(devices)], [0] * devices, 0.0)
    engine = BatchedEngine(SimpleLSTM(1, 64, 1, 12), table)
    z = np.random.default_rng(0).normal(size=(devices, 1)).astype(np.float32)
    engine.step(slots, z, [(0, devices)])
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        engine.step(slots, z, [(0, devices)])
    _sync(device)
    return {"engine_devices": devices,
            "engine_steps_per_s": round(devices * repeats / (time.perf_counter() - t0))}


def check_pipeline(device: Any, devices: int, readings: int = 3) -> dict:
    pipe = _pipeline(device, devices)
    records = _records(devices, readings + 1, seed=1)
    first, rest = records[:devices], records[devices:]
    pipe.handle(first, time.time())  # every device in memory before timing
    engine_s = [0.0]
    step = pipe.engine.step

    def timed(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = step(*a, **kw)
        _sync(device)
        engine_s[0] += time.perf_counter() - t
        return out

    pipe.engine.step = timed  # type: ignore[method-assign]
    t0 = time.perf_counter()
    for i in range(0, len(rest), 2000):
        pipe.handle(rest[i : i + 2000], time.time())
    total = time.perf_counter() - t0
    return {"pipeline_devices": devices, "pipeline_msgs_per_s": round(len(rest) / total),
            "pipeline_engine_share": round(engine_s[0] / total, 3)}


def check_worker(device: Any, messages: int = 60_000, devices: int = 4_000,
                 processes: int | None = None) -> dict:
    """The worker through a local broker, exactly-once, on ``device``: in-process, then as
    ``stream-lstm run`` with ``processes`` worker processes sharing it (default: the usable
    CPUs, at most 4; 1 leaves that run out)."""
    import uuid

    from stream_lstm.config import load_settings
    from stream_lstm.environment import usable_cpus
    from stream_lstm.kafka.jars import KAFKA_VERSION, user_cache_dir
    from stream_lstm.kafka.local_broker import ensure_local_broker
    from stream_lstm.tools.bench.core import prefill
    from stream_lstm.tools.bench.processes import run_host
    from stream_lstm.tools.bench.relay import worker_run

    if shutil.which("java") is None:
        return {"worker": "skipped: no java"}
    if not (user_cache_dir() / f"kafka-{KAFKA_VERSION}").exists() and shutil.which("mvn") is None:
        return {"worker": "skipped: no Kafka jars and no mvn to fetch them"}
    s0 = load_settings(device=device.type)
    with ensure_local_broker(s0) as bootstrap:  # the configured broker when it answers
        s = s0.model_copy(update={"bootstrap_servers": bootstrap})
        topic = f"gpu-check-{uuid.uuid4().hex[:6]}"
        prefill(s, topic, messages, devices)
        out = worker_run(s, topic, messages)
        result = {"worker_msgs_per_s": round(out["rate"]), "worker_processes": 1}
        n = processes if processes is not None else min(4, usable_cpus())
        if n > 1:  # (a fresh group over the same backlog: the same readings again; within the
            host = run_host(s, topic, messages, n, timeout_s=180)  # check's 5 minutes)
            result |= {"worker_n_processes": n, "worker_n_msgs_per_s": round(host["rate"]),
                       "worker_n_ready_s": round(host["ready_s"], 1)}
    return result


def main(args: argparse.Namespace) -> int:
    import torch

    from stream_lstm.config import SettingsError, load_settings
    from stream_lstm.engine import resolve_device

    load_settings()  # (a bad variable: one line and exit 2 now, not after minutes of figures)
    if args.report is not None and (args.report.is_dir() or not args.report.parent.is_dir()
                                    or not os.access(args.report.parent, os.W_OK)
                                    or (args.report.exists() and not os.access(args.report, os.W_OK))):
        # (said now: it failed with a traceback after every figure, the device time spent; a review)
        print(f"gpu-check: --report {args.report}: cannot write there", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
    except SettingsError:
        print(f"gpu-check: --device {args.device}, but torch sees no CUDA device (check the driver "
              "and the torch build; --device cpu checks the script)", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    steps = [("continuity (CPU against the device)", lambda: check_continuity(device)),
             (f"engine at {args.devices:,} devices", lambda: check_engine(device, args.devices)),
             (f"pipeline at {args.pipeline_devices:,} devices",
              lambda: check_pipeline(device, args.pipeline_devices))]
    if not args.skip_kafka:
        steps.append(("worker through a local broker",
                      lambda: check_worker(device, args.worker_readings, args.worker_devices,
                                           args.worker_processes)))
    for name, run in steps:
        say(f"gpu-check: {name} ...")
        t0 = time.perf_counter()
        out = run()
        say(f"  {out} ({time.perf_counter() - t0:.1f} s)")
        result.update(out)
    print(json.dumps(result), flush=True)  # (first: a report that fails to write loses no figure)
    if args.report is not None:
        try:
            args.report.write_text(report(result))
        except OSError as exc:
            print(f"gpu-check: --report {args.report}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        say(f"gpu-check: report in {args.report}")
    return 0 if result.get("continuity_ok") else 1


def report(result: dict[str, Any]) -> str:
    lines = ["# gpu-check", "", f"{result['device']} ({result.get('gpu') or 'no GPU'}), "
             f"torch {result['torch']}", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result.items() if k not in ("device", "gpu", "torch")]
    return "\n".join(lines) + "\n"
