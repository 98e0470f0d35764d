"""``stream-lstm models list | rollback VERSION``: look at and steer the model registry."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("List the model registry (STREAM_LSTM_MODEL_DIR), or roll back to an "
                          "earlier version: workers load the promoted version on start.")
    parser.add_argument("action", choices=["list", "rollback"])
    parser.add_argument("version", nargs="?", help="version to roll back to (e.g. v0003)")
    parser.add_argument("--model-dir", type=Path, default=None, help="override STREAM_LSTM_MODEL_DIR")


def main(args: argparse.Namespace) -> int:
    from stream_lstm.config import load_settings
    from stream_lstm.models.registry import ModelLoadError, ModelRegistry

    reg = ModelRegistry(args.model_dir or load_settings().model_dir)
    if args.action == "list":
        promoted = reg.promoted()
        rows = reg.versions()
        if not rows:
            print(f"no models in {reg.root}")
            return 0
        print(f"{'':2}{'version':9} {'parent':9} {'created (UTC)':19} {'holdout mae':>11} {'champion':>9}")
        for m in rows:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.get("created_at", 0)))
            metrics = m.get("metrics", {})
            mae = metrics.get("mae", metrics.get("challenger_error"))
            champ = metrics.get("champion_error")
            mark = "* " if m.get("version") == promoted else "  "
            print(f"{mark}{m.get('version', '?'):9} {str(m.get('parent') or '-'):9} {created:19} "
                  f"{'-' if mae is None else f'{mae:.4f}':>11} {'-' if champ is None else f'{champ:.4f}':>9}")
        print("(* = promoted)")
        return 0
    if not args.version:
        print("models rollback: give the VERSION to roll back to", file=sys.stderr)
        return 2
    try:
        reg.rollback(args.version)
    except ModelLoadError as exc:
        print(f"models rollback: {exc}", file=sys.stderr)
        return 2
    print(f"promoted {args.version}; workers serve it after their next start or swap")
    return 0
