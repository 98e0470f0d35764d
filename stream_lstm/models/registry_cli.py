"""``stream-lstm models list | rollback VERSION``: look at and steer the model registry.

The registry directory is ``--model-dir`` or ``STREAM_LSTM_MODEL_DIR``. ``list`` prints one
row per version (``*`` marks the promoted one); ``rollback`` promotes an existing version
again (it must load and verify) and logs it in ``promotions.jsonl``. Workers on this registry
swap to it within seconds (and on their next start); workers that follow an external trainer
(``STREAM_LSTM_TRAINER=external``) serve what the models topic says: the trainer running on
this registry publishes the version there, or ``rollback --publish`` does when none runs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("List the model registry (STREAM_LSTM_MODEL_DIR), or roll back to an "
                          "earlier version: workers load the promoted version on start or swap.")
    parser.add_argument("action", choices=["list", "rollback"],
                        help="list: show versions; rollback: promote VERSION again")
    parser.add_argument("version", nargs="?", help="version to roll back to (e.g. v0003)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="registry directory (default: STREAM_LSTM_MODEL_DIR)")
    parser.add_argument("--reason", default="", help="rollback: why (kept in the log)")
    parser.add_argument("--publish", action="store_true",
                        help="rollback: also publish VERSION to STREAM_LSTM_MODELS_TOPIC, which "
                             "workers with STREAM_LSTM_TRAINER=external follow (they swap to "
                             "it). Needed only when no trainer runs: a running `stream-lstm "
                             "trainer` on this registry takes VERSION as its champion within "
                             "seconds and publishes it itself")


def _created(value: Any) -> str:
    """The metadata's creation time as the table shows it; "-" for what is not one (a file
    written by hand: 1e300, or text with a terminal's escape codes, printed on the screen)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))
        except (OverflowError, OSError, ValueError):
            return "-"
    if isinstance(value, str) and re.fullmatch(r"[0-9T:Z .+-]{1,40}", value):
        return value.replace("T", " ").rstrip("Z")[:19]
    return "-"


def _num(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.4f}"
    return "-"


def format_table(rows: list[dict[str, Any]], promoted: str | None) -> str:
    """The ``models list`` table (one line per version; ``*`` = promoted).

    >>> print(format_table([{"version": "v0001", "created_at": "2024-01-02T03:04:05Z",
    ...                      "metrics": {"nll": -1.0, "mae": 0.25, "persistence_mae": 0.5}},
    ...                     {"version": "v0002", "parent": "v0001", "metrics": {"mae": 0.2}}],
    ...                    promoted="v0001"))
      version  parent    created (UTC)         val nll   val mae  baseline
    * v0001    -         2024-01-02 03:04:05   -1.0000    0.2500    0.5000
      v0002    v0001     -                           -    0.2000         -
    """
    # Columns as wide as their longest name (offline-... and v0000-untrained are long).
    wv = max([8, *(len(str(m.get("version", "?"))) for m in rows)])
    wp = max([9, *(len(str(m.get("parent") or "-")) for m in rows)])
    lines = [f"  {'version':{wv}} {'parent':{wp}} {'created (UTC)':19} {'val nll':>9} {'val mae':>9} "
             f"{'baseline':>9}"]
    for m in rows:
        metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
        mae = metrics.get("mae", metrics.get("val_mae", metrics.get("challenger_error")))
        nll = metrics.get("nll", metrics.get("val_nll"))
        # the error this version was compared with: persistence, or the champion it replaced
        base = metrics.get("persistence_mae", metrics.get("champion_error"))
        mark = "*" if m.get("version") == promoted else " "
        line = (f"{mark} {str(m.get('version', '?')):{wv}} {str(m.get('parent') or '-'):{wp}} "
                f"{_created(m.get('created_at')):19} {_num(nll):>9} {_num(mae):>9} {_num(base):>9}")
        if m.get("error"):
            line += f"  ({m['error']})"
        lines.append(line)
    return "\n".join(lines)


def _weights_problem(root: Path, meta: dict[str, Any]) -> str | None:
    """Why a version's weights cannot be served (missing, or not the bytes its metadata's
    sha256 names), or None."""
    import hashlib

    if meta.get("pruned"):
        from stream_lstm.models.retention import KEEP

        return f"weights pruned (the registry keeps the weights of the newest {KEEP} versions)"
    path = root / f"{meta['version']}.safetensors"
    try:
        data = path.read_bytes()
    except OSError:
        return "weights missing"
    return None if hashlib.sha256(data).hexdigest() == meta.get("sha256") else "weights damaged (sha256 differs)"


def main(args: argparse.Namespace) -> int:
    from stream_lstm.config import load_settings
    from stream_lstm.models.registry import ModelLoadError, ModelRegistry

    model_dir = args.model_dir
    if model_dir is None:
        model_dir = load_settings().model_dir
    if not Path(model_dir).is_dir():  # a mistyped directory is not "no models"
        print(f"models: no model directory at {model_dir} (--model-dir, or STREAM_LSTM_MODEL_DIR)",
              file=sys.stderr)
        return 2
    reg = ModelRegistry(model_dir)
    if args.action == "list":
        ignored = [name for name, given in (("VERSION", args.version), ("--reason", args.reason),
                                            ("--publish", args.publish)) if given]
        if ignored:  # (they belong to rollback)
            print(f"models list: ignoring {', '.join(ignored)} (rollback's)", file=sys.stderr)
        rows = reg.versions()
        if not rows:
            print(f"no models in {reg.root}")
            return 0
        for m in rows:  # what rollback would refuse, said here (the metadata alone looked fine)
            if not m.get("error"):
                m["error"] = _weights_problem(reg.root, m)
        promoted = reg.promoted()
        if promoted is None and (reg.root / reg.PROMOTED).exists():
            print(f"warning: {reg.root / reg.PROMOTED} holds no version name: nothing is promoted",
                  file=sys.stderr)
        print(format_table(rows, promoted))
        print(f"(* = promoted; baseline = persistence MAE or the replaced champion's; {reg.root})")
        if promoted is not None and promoted not in {m.get("version") for m in rows}:
            print(f"warning: PROMOTED names {promoted}, which is not in the registry", file=sys.stderr)
        return 0
    if not args.version:
        print("models rollback: give the VERSION to roll back to (see `stream-lstm models list`)",
              file=sys.stderr)
        return 2
    from stream_lstm.training.retrainer import REGISTRY_CHECK_S

    previous = reg.promoted()
    try:
        if (problem := next((_weights_problem(reg.root, m) for m in reg.versions() if m["version"] == args.version
                             and m.get("pruned")), None)):
            raise ModelLoadError(f"{args.version}: {problem}")
        reg.rollback(args.version, reason=args.reason)
    except ModelLoadError as exc:
        print(f"models rollback: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # (a full or read-only disk: nothing promoted)
        print(f"models rollback: cannot write in {reg.root}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    other = previous is not None and say_if_another_shape(reg, previous, args.version,
                                                          reg.load(args.version).spec, "models rollback")
    print(f"promoted {args.version} (was {previous or 'none'})" + ("" if other else (
        f"; running workers and a trainer on this registry take it within {REGISTRY_CHECK_S:.0f} "
        "s, others at their next start")))
    if args.publish:
        from stream_lstm.kafka.clients import KafkaConnectError
        from stream_lstm.training.retrainer import ModelPublishError

        try:
            topic = publish(reg.load(args.version))
        except (ModelPublishError, KafkaConnectError) as exc:  # (no broker: said the same way)
            print(f"models rollback: {args.version} is promoted in the registry but not "
                  f"published: {exc}", file=sys.stderr)
            return 2
        print(f"published {args.version} to {topic}: workers following it swap to it")
    return 0


def say_if_another_shape(reg: Any, before: str, version: str, spec: Any, command: str) -> bool:
    """A model of another shape than the one it replaces (``train --registry``, ``models
    rollback``): running workers refuse it, and a worker restarted with the old settings
    refuses to start (a review found it said nowhere). Whether it said so."""
    try:
        old = reg.load(before).spec.serving_shape()
    except Exception:  # noqa: BLE001 - (the old one unreadable: nothing to compare)
        return False
    new = spec.serving_shape()  # (what a running worker compares before a swap: lifecycle.py)
    if new != old:
        differ = [f"{k} {v} -> {new.to_dict()[k]}" for k, v in old.to_dict().items() if v != new.to_dict()[k]]
        print(f"{command}: warning: {version} is not the shape of {before}, which it replaces "
              f"({', '.join(differ)}): running workers keep serving {before} and refuse it (they "
              "swap only within a shape); restarted, they serve it only with settings to match. "
              f"To undo: stream-lstm models rollback {before}", file=sys.stderr)
    return new != old


def publish(loaded: Any) -> str:
    """Send a model to the models topic, as the trainer publishes a promotion; returns the
    topic's name."""
    from stream_lstm.config import load_settings
    from stream_lstm.kafka.clients import make_producer
    from stream_lstm.training.retrainer import (
        MODEL_RECORD_MAX_BYTES,
        ensure_models_topic,
        send_model,
    )

    settings = load_settings()
    ensure_models_topic(settings)
    producer = make_producer(settings, max_request_size=MODEL_RECORD_MAX_BYTES)
    try:
        send_model(producer, settings, loaded)  # (waits until the broker has it)
    finally:
        producer.close()
    return settings.models_topic
