"""``stream-lstm evaluate``: honest scores on real recordings, through the real pipeline.

Recordings are replayed into a real broker and served by a real worker; every number is
computed **from the forecasts topic**. One model serves the whole fleet: it is trained (TBPTT)
on the first half of every recording, and scored on the second half against the trivial
forecasts a user could write in one line: persistence, seasonal naive (a day and a week
back) and an exponentially weighted mean. MASE is the model's MAE over persistence's MAE on
the same targets and horizon (below 1 beats persistence).

``--etth1`` runs the standard ETTh1 protocol instead (:mod:`stream_lstm.tools.etth1`);
``--nab`` scores the alerts of an untrained model with NAB (:mod:`stream_lstm.tools.evaluate_nab`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream_lstm.tools import scoring
from stream_lstm.tools.through_worker import load, plots_available, require_readings, run_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Replay recordings through the real pipeline (broker, worker, forecasts "
                          "topic) and score the forecasts against simple baselines; writes a table, "
                          "a JSON report and PNG plots. Or run the standard ETTh1 protocol. It uses "
                          "the broker STREAM_LSTM_BOOTSTRAP_SERVERS names when one answers, with "
                          "topics and a group of the run's own (deleted at the end but the "
                          "forecasts topic eval-<id>-out, named in the report, to inspect), "
                          "else a throw-away local one. The MASE columns: the model's error over "
                          "that of persistence (1 is no better), then of the baselines: the value a "
                          "day and a week before (nan when the recording is shorter), an EWMA, "
                          "and the online peer (--peer).")
    parser.add_argument("files", nargs="*", type=Path,
                        help="CSV recordings: a time column (see --time-column) and a value column")
    parser.add_argument("--time-column", default=None, metavar="NAME",
                        help="time column of the recordings (default: 'timestamp'; in a file "
                             "without one, the first column whose values are times)")
    parser.add_argument("--out", type=Path, default=Path("reports"),
                        help="report directory (default: reports, under the current directory)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="most epochs of the offline training that comes first, on the first "
                             "half of each recording; the second halves are scored (default: "
                             "STREAM_LSTM_MAX_EPOCHS when set, else 30; early stopping usually ends "
                             "sooner). Its learning rate 3e-3, batches of 16 and patience 4 give way "
                             "to STREAM_LSTM_LEARNING_RATE, _TRAIN_BATCH_SIZE and "
                             "_EARLY_STOPPING_PATIENCE when set")
    parser.add_argument("--limit", type=int, default=0, help="first N rows of each recording")
    parser.add_argument("--etth1", type=Path, default=None, help="ETTh1.csv: run the standard protocol")
    parser.add_argument("--horizons", type=int, nargs="+", default=[24, 48], help="ETTh1 horizons (default: 24 48)")
    parser.add_argument("--peer", action="store_true",
                        help="also run the deep-river peer (an online LSTM per recording, "
                             "one-step) on the same recordings; needs the [peer] extra and deep-river: pip install -e '.[peer]' && pip install --no-deps 'deep-river==0.3.4'")
    parser.add_argument("--nab", action="store_true",
                        help="NAB's unsupervised setting instead: serve a fresh, untrained model "
                             "over every row and score its alerts (the alert events opened, and the "
                             "swept anomaly likelihood) with NAB's profiles; writes nab.json and plots")


# ---- data and training -------------------------------------------------------------------------
def train_model(settings: Any, series: dict[str, tuple[np.ndarray, np.ndarray]], epochs: int | None):
    import torch

    from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
    from stream_lstm.state.normalizer import normalize_sequence
    from stream_lstm.tools.recipe import recipe
    from stream_lstm.training.data import series_windows
    from stream_lstm.training.tbptt import train_tbptt

    train, val = [], []
    for _, x in series.values():
        half = len(x) // 2
        z, _, _ = normalize_sequence(x[:half, None], settings.normalizer, settings.normalizer_alpha,
                                     settings.std_floor)
        cut = int(half * 0.8)
        # Long windows: serving carries h/c over thousands of readings, so training sequences
        # far longer than k2 bring training closer to serving (measured: better h=12 MASE).
        train += series_windows(z[:cut], 1024, 128)
        val += series_windows(z[cut:], 256, 256)
    spec = ModelSpec(n_features=1, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                     horizon=settings.horizon, dropout=settings.dropout)
    r = recipe(settings, epochs)
    print(f"  training: learning rate {r['learning_rate']:g}, batches of {r['train_batch_size']}, up to "
          f"{r['max_epochs']} epochs, patience {r['early_stopping_patience']} (evaluate's own; "
          "STREAM_LSTM_LEARNING_RATE, _TRAIN_BATCH_SIZE, _EARLY_STOPPING_PATIENCE and --epochs replace them)",
          file=sys.stderr)
    torch.manual_seed(0)
    model = SimpleLSTM.from_spec(spec)
    t0 = time.monotonic()

    def progress(epoch: int, tr: float, va: float) -> None:
        tty = sys.stderr.isatty()  # (in a log, a line an epoch: they ran together on one line)
        print(f"{chr(13) * tty}  training: epoch {epoch}/{r['max_epochs']} train nll {tr:.3f} val nll "
              f"{va:.3f} ({time.monotonic() - t0:.0f}s)", end="" if tty else "\n", file=sys.stderr, flush=True)

    train_tbptt(model, train, val, k1=settings.tbptt_k1, k2=settings.tbptt_k2, lr=r["learning_rate"],
                weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, max_epochs=r["max_epochs"],
                patience=r["early_stopping_patience"], batch_size=r["train_batch_size"], progress=progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)  # (ends the redrawn line)
    return model.eval(), spec


# ---- scoring --------------------------------------------------------------------------------------
def aligned(forecasts: list[dict], ts: np.ndarray, horizon: int) -> dict[str, np.ndarray]:
    """Model forecasts aligned to their targets: ``F[k][t]`` predicts ``x[t]`` from ``t-k-1``."""
    n = len(ts)
    pos = {t: i for i, t in enumerate(ts.tolist())}
    fc = np.full((horizon, n), np.nan)
    lo, hi = fc.copy(), fc.copy()
    score, drift = np.full(n, np.nan), np.full(n, np.nan)
    for f in forecasts:
        i = pos.get(f["ts"])
        if i is None:
            continue
        if f.get("anomaly_score") is not None:
            score[i] = f["anomaly_score"]
        if f.get("drift_score") is not None:
            drift[i] = f["drift_score"]
        for k in range(horizon):
            if i + k + 1 < n:
                fc[k, i + k + 1] = f["forecast"][k]
                lo[k, i + k + 1] = f["lower"][k]
                hi[k, i + k + 1] = f["upper"][k]
    return {"forecast": fc, "lower": lo, "upper": hi, "score": score, "drift": drift}


def second_half(x: np.ndarray) -> np.ndarray:
    """``x`` with its first half blanked (NaN): the targets every score is computed on."""
    y = x.copy()
    y[: len(x) // 2] = np.nan
    return y


def errors(y: np.ndarray, forecast: np.ndarray, naive: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and MASE (against ``naive``) of ``forecast`` on the targets ``y``."""
    return {"mae": scoring.mae(y, forecast), "rmse": scoring.rmse(y, forecast),
            "mase": scoring.mase(y, forecast, naive)}


def score_device(ts: np.ndarray, x: np.ndarray, a: dict, horizon: int) -> dict[str, Any]:
    y = second_half(x)
    step = float(np.median(np.diff(ts)))
    day, week = max(1, round(86400 / step)), max(1, round(7 * 86400 / step))
    res: dict[str, Any] = {"readings": len(x), "step_s": step, "scored_from": len(x) // 2}
    for k in sorted({1, horizon}):
        naive = scoring.persistence(x, k)
        row = {"model": errors(y, a["forecast"][k - 1], naive)
               | {"coverage": scoring.coverage(y, a["lower"][k - 1], a["upper"][k - 1])}}
        for name, base in (("persistence", naive), ("seasonal_day", scoring.seasonal_naive(x, k, day)),
                           ("seasonal_week", scoring.seasonal_naive(x, k, week)),
                           ("ewm", scoring.ewm_forecast(x, k, 0.3))):
            row[name] = errors(y, base, naive)
        res[f"h{k}"] = row
    res["mae_by_horizon"] = [scoring.mae(y, a["forecast"][k]) for k in range(horizon)]
    res["persistence_mae_by_horizon"] = [scoring.mae(y, scoring.persistence(x, k + 1))
                                         for k in range(horizon)]
    return res


def plot_device(out: Path, name: str, ts: np.ndarray, x: np.ndarray, a: dict, res: dict,
                windows: list[tuple[float, float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    tail = slice(max(len(x) // 2, len(x) - 600), len(x))
    dates = ts[tail].astype("datetime64[s]")
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.plot(dates, x[tail], lw=1, color="black", label="actual")
    ax.plot(dates, a["forecast"][0][tail], lw=1, color="tab:blue", label="forecast (1 step)")
    ax.fill_between(dates, a["lower"][0][tail], a["upper"][0][tail], color="tab:blue", alpha=0.2,
                    label="90% interval")
    ax.set_title(f"{name}: forecast against actual (last {tail.stop - tail.start} readings)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    files.append(str(out / f"{name}-forecast.png"))
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ks = np.arange(1, len(res["mae_by_horizon"]) + 1)
    ax.plot(ks, res["mae_by_horizon"], marker="o", label="stream-lstm")
    ax.plot(ks, res["persistence_mae_by_horizon"], marker="x", label="persistence")
    ax.set_xlabel("steps ahead")
    ax.set_ylabel("MAE (original units)")
    ax.set_title(f"{name}: error by horizon")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(str(out / f"{name}-error-by-horizon.png"))
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 3))
    ax.plot(ts.astype("datetime64[s]"), a["score"], lw=0.6, color="tab:red", label="anomaly score (1 step)")
    ax.plot(ts.astype("datetime64[s]"), a["drift"], lw=0.6, color="tab:purple", alpha=0.7,
            label="drift score (H steps)")
    ax.set_yscale("log")  # scores are heavy-tailed: a linear axis shows only the largest
    ax.legend(loc="upper left", fontsize=8)
    for start, end in windows:
        ax.axvspan(np.datetime64(int(start), "s"), np.datetime64(int(end), "s"), color="orange", alpha=0.3)
    ax.set_title(f"{name}: anomaly and drift scores (|residual| / b); shaded: known failure windows")
    fig.tight_layout()
    files.append(str(out / f"{name}-anomaly.png"))
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)
    return files


def score_peer(series: dict[str, tuple[np.ndarray, np.ndarray]], report: dict) -> None:
    """Run the deep-river peer on every recording and add its one-step scores (second half)."""
    from stream_lstm.tools.peer import peer_one_step
    from stream_lstm.tools.simulate import ProgressLine

    bar = ProgressLine("evaluate: deep-river peer", sum(len(x) for _, x in series.values()),
                       verb="forecast")
    done, t0 = 0, time.monotonic()
    for name, (_, x) in series.items():
        f = peer_one_step(x, progress=lambda i, base=done: bar.update(base + i))
        done += len(x)
        report["recordings"][name]["h1"]["deep_river"] = errors(second_half(x), f,
                                                                scoring.persistence(x, 1))
    bar.finish(done)
    report["peer_readings_per_s"] = done / max(time.monotonic() - t0, 1e-9)


def print_table(report: dict, horizon: int) -> None:
    print(f"{'recording':36} {'h':>3} {'MAE':>9} {'MASE':>6} {'cover':>6} | MASE of: {'day':>6} "
          f"{'week':>6} {'ewm':>6} {'peer':>6}")
    for name, r in report["recordings"].items():
        for k in sorted({1, horizon}):
            row = r[f"h{k}"]
            m = row["model"]
            peer = f"{row['deep_river']['mase']:6.3f}" if "deep_river" in row else f"{'-':>6}"
            print(f"{name[:36]:36} {k:>3} {m['mae']:9.3f} {m['mase']:6.3f} {m['coverage']:6.1%} |"
                  f"          {row['seasonal_day']['mase']:6.3f} {row['seasonal_week']['mase']:6.3f} "
                  f"{row['ewm']['mase']:6.3f} {peer}")


def labelled_windows(windows_json: Path, name: str) -> list[tuple[float, float]]:
    """NAB's windows of recording ``name``; none for a recording NAB does not label (given
    beside one it does: its KeyError lost the whole run's report, after the run).

    >>> import json, tempfile
    >>> p = Path(tempfile.mkdtemp()) / "combined_windows.json"
    >>> _ = p.write_text(json.dumps({"realKnownCause/m.csv": []}))
    >>> labelled_windows(p, "m"), labelled_windows(p, "my-pump")
    ([], [])
    """
    try:
        return scoring.nab_windows(windows_json, name + ".csv")
    except KeyError:
        return []


def main(args: argparse.Namespace) -> int:
    import torch

    from stream_lstm.config import load_settings

    settings = load_settings()
    # Training threads as the background trainer uses them. On the idle 2-core machine, 1 and 2
    # threads trained equally fast (10 s for 3 epochs). With another job sharing the cores, 2
    # threads took 67 s an epoch, not 3: spinning threads fight for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.train_threads)
    try:
        return _run(args, settings)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, settings: Any) -> int:
    from stream_lstm.kafka.local_broker import ensure_local_broker

    if settings.n_features != 1:  # (a 1-channel model served to 2-channel settings: every reading dead-lettered)
        print(f"evaluate: the recordings are one value column each; STREAM_LSTM_N_FEATURES is "
              f"{settings.n_features}: unset it", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # (a file of that name: it was a FileExistsError traceback, a review)
        print(f"evaluate: --out {args.out}: cannot be the report directory ({exc.strerror or exc})",
              file=sys.stderr)
        return 2
    if args.etth1:
        from stream_lstm.recordings import RecordingError
        from stream_lstm.tools.etth1 import etth1_protocol

        try:
            report = etth1_protocol(args.etth1, args.horizons, settings, args.epochs)
        except RecordingError as exc:  # (a mistyped path: one line, as for the recordings)
            print(f"evaluate: {exc}", file=sys.stderr)
            return 2
        (args.out / "etth1.json").write_text(json.dumps(report, indent=2))
        print(f"report: {args.out / 'etth1.json'}")
        return 0
    if not args.files:
        print("evaluate: give CSV recordings, or --etth1 PATH", file=sys.stderr)
        return 2
    if getattr(args, "nab", False):
        if args.peer:
            print("evaluate: --nab scores alerts; leave out --peer", file=sys.stderr)
            return 2
        from stream_lstm.tools.evaluate_nab import run_nab

        return run_nab(args, settings)
    if args.peer:
        from stream_lstm.tools.peer import INSTALL_HINT, peer_available

        if not peer_available():  # say so before minutes of training, not after
            print(f"evaluate: --peer needs deep-river. {INSTALL_HINT}", file=sys.stderr)
            return 2
    from stream_lstm.tools.replay import ReplayError

    try:
        series = load(args.files, args.limit, getattr(args, "time_column", None))
        require_readings(series)
    except ReplayError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    print(f"evaluate: {len(series)} recordings, {sum(len(v[1]) for v in series.values()):,} readings",
          file=sys.stderr)
    from stream_lstm.kafka.jars import JAVA_HINT, fetch_jars, require_tool
    from stream_lstm.kafka.local_broker import broker_answers

    # A local broker it cannot start: said before the training (only a plaintext one is ever
    # replaced by a local broker: ensure_local_broker). The answer is used after the training:
    # a broker that comes up meanwhile is not, one that goes down fails the run.
    answers = broker_answers(settings)
    if settings.security_protocol == "PLAINTEXT" and not answers:
        require_tool("java", JAVA_HINT)
        fetch_jars()
    model, spec = train_model(settings, series, args.epochs)
    with ensure_local_broker(settings, answers) as bootstrap:
        s = settings.model_copy(update={"bootstrap_servers": bootstrap})
        forecasts, output_topic = run_pipeline(s, series, model, spec)
    windows_json = Path(args.files[0]).resolve().parent
    while windows_json.name and not (windows_json / "combined_windows.json").exists():
        windows_json = windows_json.parent
    can_plot = plots_available()
    report: dict[str, Any] = {"horizon": spec.horizon, "output_topic": output_topic,
                              "bootstrap_servers": bootstrap, "recordings": {}, "plots": []}
    for name, (ts, x) in series.items():
        a = aligned(forecasts.get(name, []), ts, spec.horizon)
        res = score_device(ts, x, a, spec.horizon)
        wins = []
        if (windows_json / "combined_windows.json").exists():
            wins = labelled_windows(windows_json / "combined_windows.json", name)
            if wins:  # how many of the 10 highest scores fall inside a labelled window
                res["top10_in_windows"] = {
                    "anomaly_score": scoring.top_k_in_windows(ts, a["score"], wins, k=10),
                    "drift_score": scoring.top_k_in_windows(ts, a["drift"], wins, k=10),
                    "either": scoring.top_k_in_windows(ts, np.fmax(a["score"], a["drift"]), wins, k=10)}
        res["forecasts_read"] = len(forecasts.get(name, []))
        report["recordings"][name] = res
        if can_plot:
            report["plots"] += plot_device(args.out, name, ts, x, a, res, wins)
    if args.peer:
        score_peer(series, report)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print_table(report, spec.horizon)
    print(f"report: {args.out / 'report.json'}; plots in {args.out}")
    return 0
