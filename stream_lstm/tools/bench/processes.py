"""``processes_ratio``: a backlog of 4,000 devices consumed by ``stream-lstm run`` with
``STREAM_LSTM_PROCESSES=2`` / with 1, over the same pre-filled topic in the same run.

Each run is the command a user starts (a fresh consumer group, default settings but
``MIN_HISTORY=1``, a fresh untrained model, its own state directory), watched through its
metrics endpoint: the readings/s count from the moment ``/readyz`` first answers 200 (every
process has its partitions, restored) to the moment the consumed counter reaches the backlog,
so the start-up and the group's first rebalances are left out of both (in a run too small for
that, from the last look that saw nothing consumed yet: never a rate of 0). The seconds from
the command's start to every process ready (``processes_<n>_ready_s``) and to the end
(``processes_<n>_wall_s``) include them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from stream_lstm.tools.bench.fixture import say

DEVICES = 4_000
QUICK_BACKLOG = 200_000  # about 10 s for one process here
CONSUMED = "stream_lstm_readings_consumed_total"


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:  # not serving yet
        return 0, ""


def consumed(port: int) -> float:
    """The readings the host at ``port`` has consumed and committed (0 before it serves)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = _get(port, "/metrics")
    if status != 200:
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == CONSUMED)


def run_host(settings: Any, topic: str, readings: int, processes: int,
             timeout_s: float = 600) -> dict[str, float]:
    """``stream-lstm run`` with ``processes`` worker processes over the backlog on ``topic``,
    until it has consumed ``readings``: ``{"rate", "wall_s", "ready_s", "counted"}`` (seconds
    from the start to the end and to every process ready; the readings the rate counts)."""
    from stream_lstm.kafka.local_broker import free_port
    from stream_lstm.tools.bench.live import _env

    tmp = Path(tempfile.mkdtemp(prefix="bench-processes-"))
    s = settings.model_copy(update={
        "input_topic": topic, "output_topic": f"{topic}-out{processes}",
        "dlq_topic": f"{topic}-dlq{processes}", "min_history": 1, "processes": processes,
        "group_id": f"bench-processes-{processes}-{uuid.uuid4().hex[:6]}",
        "instance_id": "bench", "metrics_port": free_port(), "metrics_host": "127.0.0.1",
        "state_dir": tmp / "state", "model_dir": tmp / "models", "model_path": None,
    })
    log_path = tmp / "run.log"
    t_start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "stream_lstm.cli", "run"], env=_env(s),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_at, at_ready, first, done_at = None, 0.0, None, None
        before_first = t_start  # the last look that saw nothing consumed
        while done_at is None:
            if proc.poll() is not None or time.perf_counter() - t_start > timeout_s:
                raise RuntimeError(f"stream-lstm run ({processes} processes) "
                                   + ("exited" if proc.poll() is not None else "timed out")
                                   + ":\n" + log_path.read_text()[-3000:])
            now, n = time.perf_counter(), consumed(s.metrics_port)
            if n == 0:
                before_first = now
            elif first is None:
                first = (before_first, 0)
            if ready_at is None and (n >= readings or _get(s.metrics_port, "/readyz")[0] == 200):
                ready_at, at_ready = now, n
            if n >= readings:
                done_at = time.perf_counter()
            else:
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    assert first is not None and ready_at is not None and done_at is not None
    ready_s = ready_at - t_start
    if readings - at_ready < readings / 10:  # (small runs) nearly all of it before every process
        ready_at, at_ready = first            # was ready: from the last look at nothing counted
    counted = readings - at_ready
    rate = counted / (done_at - ready_at) if counted > 0 and done_at > ready_at else 0.0
    return {"rate": rate, "wall_s": done_at - t_start, "ready_s": ready_s, "counted": counted}


def bench_processes(settings: Any, topic: str, messages: int, result: dict, quick: bool,
                    devices: int = DEVICES) -> dict:
    from stream_lstm.environment import usable_cpus
    from stream_lstm.tools.bench.core import prefill

    # The quick run's backlog too must outlast the two-process group's start-up (5-11 s before
    # both children hold partitions, measured): 40,000 readings were consumed before it, and
    # the ratio then timed the start-up, not the mode (docs/benchmarks.md).
    n = QUICK_BACKLOG if quick else max(messages, devices * 15)
    t = f"bench-processes-{uuid.uuid4().hex[:6]}"
    say(f"1 process against 2: a backlog of {n:,} readings from {devices:,} devices ...")
    prefill(settings, t, n, devices)
    one = run_host(settings, t, n, 1)
    two = run_host(settings, t, n, 2)
    ratio = two["rate"] / one["rate"] if one["rate"] else 0.0
    say(f"  1 process {one['rate']:,.0f}/s (ready after {one['ready_s']:.1f} s, done after "
        f"{one['wall_s']:.1f} s), 2 processes {two['rate']:,.0f}/s (ready after "
        f"{two['ready_s']:.1f} s, done after {two['wall_s']:.1f} s) -> processes_ratio "
        f"{ratio:.2f} on {usable_cpus()} CPUs")
    return {
        "processes_backlog_readings": n, "processes_devices": devices,
        "processes_cpus": usable_cpus(),
        "processes_1_msgs_per_s": round(one["rate"]), "processes_2_msgs_per_s": round(two["rate"]),
        "processes_1_wall_s": round(one["wall_s"], 1), "processes_2_wall_s": round(two["wall_s"], 1),
        "processes_1_ready_s": round(one["ready_s"], 1), "processes_2_ready_s": round(two["ready_s"], 1),
        "processes_ratio": round(ratio, 3),
    }
