"""``stream-lstm train``: fit an initial model on a CSV recording and save it.

The recording (one device; rows sorted by time) is normalized exactly as serving does
(online, step by step: :func:`~stream_lstm.state.normalizer.normalize_sequence`, the serving code itself), split by
time (the last ``--val-fraction`` validates), cut into windows of ``2 * --window`` readings
(training windows overlap by half; validation windows do not), and trained with TBPTT
(:func:`~stream_lstm.training.tbptt.train_tbptt`) with a progress bar on stderr. The model
is saved as safetensors + JSON metadata (never pickle) with
:func:`~stream_lstm.models.registry.save_model`; serve it with ``STREAM_LSTM_MODEL_PATH``,
or pass ``--registry`` to also register and promote it in the model directory.

Model shape and training knobs come from the settings (``STREAM_LSTM_HIDDEN_SIZE``,
``..._TBPTT_K1``, ...); the flags below override them for this run.

The recording is read with :func:`~stream_lstm.recordings.load_csv`, as ``replay`` reads it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

# The options that stand for a setting (option's dest -> setting): passed to load_settings, so
# they are held to the settings' own rules (a negative size, k2 below k1).
# (Not --window: a training sequence's length, which the serving rules around it do not bind.)
SETTING_OF = {"epochs": "max_epochs", "hidden_size": "hidden_size",
              "num_layers": "num_layers", "horizon": "horizon", "k1": "tbptt_k1", "k2": "tbptt_k2",
              "lr": "learning_rate", "batch_size": "train_batch_size", "threads": "train_threads"}


def _at_least(least: int):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, not {value}")
        return value
    return parse


def _model_file(text: str) -> Path:
    """``--out``: a file (``model`` or ``model.safetensors``), not a directory (``out/``: the
    slash was dropped, and ``out.safetensors`` written beside it; a review)."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} names a directory: give the model's file, "
                                         f"e.g. {text}model.safetensors")
    return Path(text)


def _model_files(out: Path) -> tuple[Path, Path]:
    """The weights and the metadata file ``--out`` writes (registry.save_model's names)."""
    weights = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
    return weights, weights.with_suffix(".json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Fit an initial model offline on a CSV recording (TBPTT, with a "
                          "progress bar) and save it as safetensors + JSON metadata.")
    parser.add_argument("--csv", type=Path, required=True, help="the recording (one device)")
    parser.add_argument("--column", action="append", dest="columns",
                        help="value column (default: value); repeat for several channels")
    parser.add_argument("--target-column", default=None,
                        help="column to forecast (default: channel STREAM_LSTM_TARGET_CHANNEL)")
    parser.add_argument("--time-column", default=None, metavar="NAME",
                        help="time column: epoch seconds or ISO 8601 (naive = UTC). Default: "
                             "'timestamp'; in a file without one, the first column whose values "
                             "are times (ETTh1: 'date'), named on stderr")
    parser.add_argument("--out", type=_model_file, default=None,
                        help="output path (.safetensors); optional with --registry")
    parser.add_argument("--max-rows", type=_at_least(1), default=None, help="use only the first N rows")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="last fraction of the recording used for validation (default 0.2)")
    parser.add_argument("--window", type=_at_least(2), default=None,
                        help="W: training sequences are 2*W readings (default: STREAM_LSTM_WINDOW)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="most epochs; early stopping usually ends sooner (default: STREAM_LSTM_MAX_EPOCHS)")
    parser.add_argument("--hidden-size", type=int, default=None,
                        help="LSTM hidden units (default: STREAM_LSTM_HIDDEN_SIZE)")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="stacked LSTM layers (default: STREAM_LSTM_NUM_LAYERS)")
    parser.add_argument("--horizon", type=int, default=None,
                        help="H, steps ahead forecast (default: STREAM_LSTM_HORIZON); a worker "
                             "refuses a model whose H differs from its own")
    parser.add_argument("--k1", type=int, default=None,
                        help="TBPTT: steps between updates (default: STREAM_LSTM_TBPTT_K1)")
    parser.add_argument("--k2", type=int, default=None,
                        help="TBPTT: steps each update backpropagates through (default: STREAM_LSTM_TBPTT_K2)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: STREAM_LSTM_LEARNING_RATE)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per update (default: STREAM_LSTM_TRAIN_BATCH_SIZE)")
    parser.add_argument("--seed", type=int, default=0,
                        help="torch seed for the initial weights and the shuffling (default 0)")
    parser.add_argument("--version", default=None,
                        help="version stamped on the saved model (default: offline-<UTC time>, never a "
                             "registry's vNNNN: a worker that later follows a trainer's v0001 must not "
                             "take it for the same weights)")
    parser.add_argument("--parent", default=None,
                        help="the version it was trained from, stamped on the model (a worker "
                             "started from that version's file follows it after a restart)")
    parser.add_argument("--registry", action="store_true",
                        help="register it (next version) and promote it in the model directory: "
                             "running workers on that directory swap to it within seconds; with "
                             "--out too, the file holds the same weights under the --version name")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="registry directory for --registry (default: STREAM_LSTM_MODEL_DIR)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: STREAM_LSTM_TRAIN_THREADS)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(args: argparse.Namespace) -> int:
    import torch

    from stream_lstm.config import SettingsError, load_settings
    from stream_lstm.models.lstm import ModelSpec, SimpleLSTM, largest_weight
    from stream_lstm.models.registry import (
        MAX_WEIGHT,
        NUMBERED_RE,
        VERSION_RE,
        ModelRegistry,
        save_model,
    )
    from stream_lstm.models.registry_cli import say_if_another_shape
    from stream_lstm.recordings import DEFAULT_TIME_COLUMN, RecordingError, load_csv
    from stream_lstm.state.normalizer import normalize_sequence
    from stream_lstm.training.data import series_windows
    from stream_lstm.training.tbptt import evaluate, train_tbptt

    try:
        s = load_settings(**{name: getattr(args, dest) for dest, name in SETTING_OF.items()
                             if getattr(args, dest) is not None})
    except SettingsError as exc:  # name the option the user gave, beside its variable
        said = str(exc)
        for dest, name in SETTING_OF.items():
            if getattr(args, dest) is not None:
                variable = f"STREAM_LSTM_{name.upper()}"
                said = said.replace(variable, f"--{dest.replace('_', '-')} ({variable})")
        print(f"train: {said}", file=sys.stderr)
        return 2
    if args.version is not None and not VERSION_RE.match(args.version):
        print(f"train: --version {args.version[:80]!r} is not a version name (letters, digits, "
              "'.', '_', '-'; at most 64)", file=sys.stderr)
        return 2
    if args.parent is not None and not VERSION_RE.match(args.parent):  # (followed by serving.py)
        print(f"train: --parent {args.parent[:80]!r} is not a version name", file=sys.stderr)
        return 2
    if args.out is None and not args.registry:
        print("train: say where the model goes: --out PATH, --registry, or both", file=sys.stderr)
        return 2
    if args.out is not None and any(p.is_dir() for p in (args.out, *_model_files(args.out))):
        # (it wrote <dir>.safetensors beside a directory, a review; and a directory where a
        # file of the model goes failed after the training)
        print(f"train: --out {args.out} is a directory: give the model's file, e.g. "
              f"{Path(args.out) / 'model.safetensors'}", file=sys.stderr)
        return 2
    if args.version is not None and NUMBERED_RE.match(args.version):  # (as its help says)
        print(f"train: --version {args.version} is a registry's numbering: a worker that later "
              "follows a trainer's version of that name would take it for the same weights; "
              "choose another name (--registry numbers it in the registry)", file=sys.stderr)
        return 2
    columns = args.columns or ["value"]
    if len(set(columns)) < len(columns):  # (a channel twice: a model of more channels than there are)
        print(f"train: --column names a column twice ({', '.join(columns)})", file=sys.stderr)
        return 2
    if args.target_column is not None and args.target_column not in columns:
        print(f"train: --target-column {args.target_column} is not one of {columns}", file=sys.stderr)
        return 2
    target = columns.index(args.target_column) if args.target_column else s.target_channel
    if target >= len(columns):
        print(f"train: target channel {target} but only {len(columns)} column(s)", file=sys.stderr)
        return 2
    if not 0.0 < args.val_fraction < 1.0:
        print("train: --val-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    if args.model_dir is not None and not args.registry:  # (accepted and ignored before)
        print("train: --model-dir is where --registry registers: add --registry, or leave it out",
              file=sys.stderr)
        return 2
    registry_dir = Path(args.model_dir or s.model_dir)
    for flag, where in (("--out", args.out and args.out.parent), ("--registry", args.registry and registry_dir)):
        try:  # said before the training, not after it
            if where:
                where.mkdir(parents=True, exist_ok=True)
                if not os.access(where, os.W_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied")
        except OSError as exc:
            print(f"train: cannot write {flag} {args.out if flag == '--out' else where}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
    time_column = args.time_column or DEFAULT_TIME_COLUMN

    def chosen(column: str, message: str) -> None:  # no `timestamp` column: say which was used
        nonlocal time_column
        time_column = column
        print(f"train: {message}", file=sys.stderr)

    try:
        ts, x = load_csv(args.csv, args.time_column, columns, note=chosen)
    except RecordingError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    if args.max_rows:
        ts, x = ts[: args.max_rows], x[: args.max_rows]
    window = args.window or s.window
    split = int(len(x) * (1 - args.val_fraction))
    if split < 4 or len(x) - split < 2:
        print(f"train: {len(x)} rows are too few to train and validate", file=sys.stderr)
        return 2
    if len(columns) != s.n_features or target != s.target_channel:  # (a worker refuses it otherwise)
        print(f"train: note: the model has {len(columns)} channel(s) and forecasts channel {target}; "
              f"serving it needs STREAM_LSTM_N_FEATURES={len(columns)} and "
              f"STREAM_LSTM_TARGET_CHANNEL={target} (now {s.n_features} and {s.target_channel})",
              file=sys.stderr)

    z, _, _ = normalize_sequence(x, s.normalizer, s.normalizer_alpha, s.std_floor)
    length = 2 * window
    train_seqs = series_windows(z[:split], length, window)
    val_seqs = series_windows(z[split:], length, length)
    spec = ModelSpec(n_features=len(columns), hidden_size=s.hidden_size,
                     num_layers=s.num_layers, horizon=s.horizon,
                     target_channel=target, dropout=s.dropout)
    knobs = {"k1": s.tbptt_k1, "k2": s.tbptt_k2,
             "lr": s.learning_rate, "weight_decay": s.weight_decay,
             "grad_clip": s.grad_clip, "max_epochs": s.max_epochs,
             "patience": s.early_stopping_patience, "batch_size": s.train_batch_size,
             "seed": args.seed}
    torch.manual_seed(args.seed)
    model = SimpleLSTM.from_spec(spec)
    print(f"training on {args.csv.name}: {split:,} rows ({len(train_seqs)} windows of {length}), "
          f"validating on {len(x) - split:,} ({len(val_seqs)} windows)", file=sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, s.train_threads))  # small models: 1 is fastest
    try:
        result = train_tbptt(model, train_seqs, val_seqs, target=target,
                             progress=not args.quiet, **knobs)
        metrics = evaluate(model, val_seqs, target)
    finally:
        torch.set_num_threads(threads)
    meta = {
        "version": args.version or time.strftime("offline-%Y%m%dT%H%M%SZ", time.gmtime()), "parent": args.parent,
        "source": {"csv": str(args.csv), "columns": columns, "time_column": time_column},
        "training_data": {"first_ts": float(ts[0]), "last_ts": float(ts[split - 1]),
                          "first": _iso(ts[0]), "last": _iso(ts[split - 1]), "rows": split},
        "validation_data": {"first_ts": float(ts[split]), "last_ts": float(ts[-1]),
                            "first": _iso(ts[split]), "last": _iso(ts[-1]), "rows": len(x) - split},
        "metrics": {**metrics, "epochs": result.epochs, "best_epoch": result.best_epoch,
                    "best_val_nll": result.best_val, "initial_val_nll": result.initial_val,
                    "train_seconds": round(result.seconds, 3)},
        "settings": {"window": window, "normalizer": s.normalizer,
                     "normalizer_alpha": s.normalizer_alpha, "std_floor": s.std_floor,
                     "dropout": s.dropout, **knobs},
    }
    mae, base = metrics["mae"], metrics["persistence_mae"]
    gain = ""
    if base and math.isfinite(base):
        better = 1 - mae / base
        gain = f" ({abs(better):.1%} {'better' if better >= 0 else 'worse'} than persistence)"
    kept = (f"; kept epoch {result.best_epoch}'s weights, the best on validation"
            if result.best_epoch and result.best_epoch != result.epochs else "")
    if not (largest := largest_weight(model)) <= MAX_WEIGHT:
        print(f"train: the trained model has a weight of {largest:.3g}, past the ±{MAX_WEIGHT:g} a "
              "worker loads: nothing saved (a lower --lr, or STREAM_LSTM_WEIGHT_DECAY)", file=sys.stderr)
        return 2
    if args.out is not None:
        try:
            path = save_model(model, spec, args.out, meta)
        except OSError as exc:
            print(f"train: cannot write --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"saved {path} (+ {path.with_suffix('.json').name}) as {meta['version']}")
    print(f"trained {result.epochs} epoch(s) in {result.seconds:.1f}s{kept}")
    print(f"validation one-step MAE {mae:.4f} vs persistence (zero change) {base:.4f} "
          f"in normalized units{gain}")
    if args.registry:
        reg = ModelRegistry(registry_dir)
        before = reg.promoted()
        try:
            version = reg.register(model, spec, {**meta, "version": None})
            reg.promote(version, reason=f"stream-lstm train --csv {args.csv}")
        except OSError as exc:  # (a disk that filled during the training)
            print(f"train: cannot register in {reg.root}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        also = f" (the same weights as {path.name}, {meta['version']})" if args.out is not None else ""
        print(f"registered and promoted {version} in {reg.root}{also}")
        if before is not None:
            say_if_another_shape(reg, before, version, spec, "train")
    return 0
