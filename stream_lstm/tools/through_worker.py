"""Recordings through the real worker, for the offline commands (``evaluate``, ``evaluate --nab``).

:func:`load` reads recordings as ``{name: (ts, values)}``; :func:`run_pipeline` replays them
into a fresh input topic of a real broker, serves them with a real :class:`Worker`, and reads
the forecasts back from the output topic under read_committed: every figure the evaluations
report is computed from what a downstream consumer would see.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def plots_available() -> bool:
    """Whether matplotlib is installed; says on stderr that there will be no plots if not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("evaluate: matplotlib is not installed, so no plots "
              "(pip install 'stream-lstm[plots]')", file=sys.stderr)
        return False
    return True


MIN_READINGS = 100


def load(files: list[Path], limit: int,
         time_column: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (ts, values)}`` of each recording's ``value`` column (first ``limit`` rows);
    the time column as :func:`~stream_lstm.recordings.load_csv` picks it, said on stderr."""
    from stream_lstm.tools.replay import load_csv, stderr_note

    out = {}
    for f in files:
        ts, x = load_csv(f, time_column, note=stderr_note("evaluate"))
        ts, x = ts[:limit or None], x[:limit or None, 0]
        keep = np.concatenate([[True], np.diff(ts) > 0]) if len(ts) else np.zeros(0, bool)
        out[f.stem] = (ts[keep], x[keep])
    return out


def require_readings(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """:class:`~stream_lstm.tools.replay.ReplayError` for a recording too short to evaluate (a
    header alone, or one row, was a traceback from deep inside the training)."""
    from stream_lstm.tools.replay import ReplayError

    for name, (ts, _) in series.items():
        if len(ts) < MIN_READINGS:
            raise ReplayError(f"{name}: {len(ts)} readings with increasing timestamps; evaluate "
                              f"needs at least {MIN_READINGS} a recording (it trains on the first "
                              "half and scores forecasts after a warm-up)")


def run_pipeline(settings: Any, series: dict, model: Any, spec: Any) -> tuple[dict[str, list[dict]], str]:
    """Replay every series through broker + worker; return the forecasts read back from the
    output topic, per device, and that topic's name.

    The run's topics are its own; all but the forecasts topic (input, dead letters, changelog,
    alerts, models) are deleted when it ends, and that one too when it ends without a result. The worker keeps its state and its model directory (the served model's weights are kept
    there, and a retrain registers there) in a temporary directory, removed when the run ends,
    failed or not: each run has its own, so without that every evaluation would leave one
    behind, and its models in the user's registry.
    """
    run = f"eval-{uuid.uuid4().hex[:8]}"
    # ignore_cleanup_errors: a file that cannot be removed must not hide the run's own result
    # or error.
    with tempfile.TemporaryDirectory(prefix="stream-lstm-eval-", ignore_cleanup_errors=True) as state:
        # Every topic the run writes or follows is its own (the changelog follows the group): on
        # your broker it wrote your deployment's changelog and alerts, and with TRAINER=external
        # it served your models topic's model instead of the one it trained (a review).
        s = settings.model_copy(update={
            "input_topic": run, "output_topic": f"{run}-out", "dlq_topic": f"{run}-dlq",
            "alerts_topic": f"{run}-alerts" if settings.alerts_topic else "", "changelog_topic": "",
            "models_topic": f"{run}-models", "group_id": run, "min_history": 1, "metrics_port": 0,
            "state_dir": Path(state), "model_dir": Path(state) / "models", "max_future_skew_s": 1e12})
        served = False
        try:
            result = _serve(s, series, model, spec)
            served = True
            return result
        finally:
            _delete_own_topics(s, forecasts_too=not served)


def _delete_own_topics(s: Any, forecasts_too: bool) -> None:
    """The run's working topics and its groups go with it: a shared cluster must not collect a
    set per evaluation. Its forecasts topic stays, named in the report, for a check of its own,
    unless the run ended without a result (stopped or failed): no report names it then, and
    each interrupted evaluation left one behind (a review)."""
    from stream_lstm.kafka.topics import delete_leftovers

    own = [s.input_topic, s.dlq_topic, s.alerts_topic, s.changelog_topic_name(), s.models_topic,
           s.output_topic if forecasts_too else ""]
    try:  # (and its consumer groups: the worker's and the reader's)
        delete_leftovers(s, [t for t in own if t], [s.group_id, f"{s.group_id}-reader"])
    except Exception as exc:  # noqa: BLE001 - said, never hiding the run's own result or error
        print(f"evaluate: could not delete this run's topics ({', '.join(t for t in own if t)}): {exc!r}"[:300],
              file=sys.stderr)


def _serve(s: Any, series: dict, model: Any, spec: Any) -> tuple[dict[str, list[dict]], str]:
    """:func:`run_pipeline` under ``s``, the run's own topics, group and state directory."""
    from stream_lstm.encoding import encode_reading
    from stream_lstm.kafka.clients import make_consumer, make_producer
    from stream_lstm.models.registry import LoadedModel
    from stream_lstm.tools.simulate import ProgressLine
    from stream_lstm.worker import Worker

    run = s.group_id
    events = sorted((t, dev, v) for dev, (ts, x) in series.items() for t, v in zip(ts, x, strict=True))
    from stream_lstm.kafka.topics import ensure_worker_topics

    ensure_worker_topics(s)
    producer = make_producer(s, linger_ms=20)
    for t, dev, v in events:
        producer.send(s.input_topic, encode_reading(dev, float(t), [float(v)]), key=dev.encode())
    producer.flush()
    producer.close()
    worker = Worker(s, LoadedModel.of(model, spec, "eval"))
    bar = ProgressLine("evaluate: worker", len(events), verb="consumed")
    t0 = time.monotonic()

    def until(w: Worker) -> bool:
        bar.update(w.totals.consumed)
        return w.totals.consumed >= len(events) or time.monotonic() - t0 > 1800

    totals = worker.run(until=until)
    bar.finish(totals.consumed)
    rate = totals.consumed / max(time.monotonic() - t0, 1e-9)
    consumer = make_consumer(s, s.output_topic, group_id=f"{run}-reader", auto_offset_reset="earliest",
                             isolation_level="read_committed", enable_auto_commit=False)
    out: dict[str, list[dict]] = {}
    seen, idle = 0, time.monotonic()
    while seen < totals.forecasts and time.monotonic() - idle < 15:
        for recs in consumer.poll(timeout_ms=500).values():
            idle = time.monotonic()
            for r in recs:
                f = json.loads(r.value)
                out.setdefault(f["device_id"], []).append(f)
                seen += 1
    consumer.close()
    print(f"evaluate: {totals.consumed:,} readings through the worker at {rate:,.0f}/s, "
          f"{seen:,} forecasts read back from {s.output_topic}", file=sys.stderr)
    return out, s.output_topic
