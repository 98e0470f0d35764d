"""``stream-lstm train``: fit an initial model on a CSV recording and save it.

The series is normalized exactly as serving does (online, step by step), cut into overlapping
windows, split by time (the last ``--val-fraction`` is validation), and trained with TBPTT.
The result is saved as safetensors plus JSON metadata (no pickle) and can be served with
``STREAM_LSTM_MODEL_PATH`` or registered with ``--registry``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Fit an initial model offline on a CSV recording (TBPTT, with a "
                           "progress bar) and save it as safetensors + JSON metadata.")
    parser.add_argument("--csv", type=Path, required=True, help="the recording")
    parser.add_argument("--column", action="append", dest="columns",
                        help="value column(s) (default: value); repeat for multi-channel")
    parser.add_argument("--time-column", default="timestamp")
    parser.add_argument("--out", type=Path, required=True, help="output path (.safetensors)")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs (default: setting)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--max-rows", type=int, default=0, help="use only the first N rows")
    parser.add_argument("--version", default="v0001", help="version stamped on the model")
    parser.add_argument("--registry", action="store_true",
                        help="also register and promote it in STREAM_LSTM_MODEL_DIR")


def bar(epoch: int, total: int, train: float, val: float, t0: float) -> None:
    filled = int(20 * epoch / total)
    print(f"\r  [{'#' * filled}{'.' * (20 - filled)}] epoch {epoch}/{total}  train nll {train:.4f}  "
          f"val nll {val:.4f}  {time.monotonic() - t0:.0f}s", end="", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    import torch

    from stream_lstm.config import load_settings
    from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
    from stream_lstm.models.registry import ModelRegistry, save_model
    from stream_lstm.state.normalizer import normalize_sequence
    from stream_lstm.tools.replay import CsvError, load_csv
    from stream_lstm.training.data import series_windows
    from stream_lstm.training.tbptt import evaluate, train_tbptt

    s = load_settings()
    columns = args.columns or ["value"]
    try:
        ts, x = load_csv(args.csv, args.time_column, columns)
    except CsvError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    if args.max_rows:
        ts, x = ts[: args.max_rows], x[: args.max_rows]
    z, _, _ = normalize_sequence(x, s.normalizer, s.normalizer_alpha, s.std_floor)
    split = int(len(z) * (1 - args.val_fraction))
    length = max(4 * s.tbptt_k2, 128)
    train = series_windows(z[:split], length, length // 2)
    val = series_windows(z[split:], length, length)
    spec = ModelSpec(n_features=len(columns), hidden_size=s.hidden_size, num_layers=s.num_layers,
                     horizon=s.horizon, target_channel=0, dropout=s.dropout)
    torch.manual_seed(0)
    model = SimpleLSTM.from_spec(spec)
    epochs = args.epochs or s.max_epochs
    print(f"training on {args.csv.name}: {split:,} rows ({len(train)} windows of {length}), "
          f"validating on {len(z) - split:,}", file=sys.stderr)
    t0 = time.monotonic()
    result = train_tbptt(model, train, val, k1=s.tbptt_k1, k2=s.tbptt_k2, lr=s.learning_rate,
                         weight_decay=s.weight_decay, grad_clip=s.grad_clip, max_epochs=epochs,
                         patience=s.early_stopping_patience, batch_size=s.train_batch_size,
                         progress=lambda e, tr, va: bar(e, epochs, tr, va, t0))
    print(file=sys.stderr)
    metrics = evaluate(model, val)
    meta = {
        "version": args.version, "parent": None, "source": str(args.csv),
        "training_data": {"first_ts": float(ts[0]), "last_ts": float(ts[split - 1]), "rows": split},
        "metrics": {**metrics, "epochs": result.epochs, "best_val_nll": result.best_val},
        "settings": {k: v for k, v in s.redacted().items() if k in (
            "window", "horizon", "hidden_size", "num_layers", "tbptt_k1", "tbptt_k2", "learning_rate",
            "weight_decay", "grad_clip", "dropout", "normalizer", "normalizer_alpha", "std_floor")},
    }
    path = save_model(model, spec, args.out, meta)
    print(f"saved {path} (+ {path.with_suffix('.json').name}); validation one-step MAE "
          f"{metrics['mae']:.4f} vs persistence {metrics['persistence_mae']:.4f} (normalized units)")
    if args.registry:
        reg = ModelRegistry(s.model_dir)
        version = reg.register(model, spec, {**meta, "version": reg.next_version()})
        reg.promote(version)
        print(f"registered and promoted {version} in {s.model_dir}")
    return 0


