"""``stream-lstm evaluate FILES... --nab``: NAB scores of the alerts, through the real pipeline.

NAB's unsupervised setting: no pre-training. A freshly initialised model (the default
settings, seed 0) serves every row of each recording through a real broker and worker
(:func:`~stream_lstm.tools.through_worker.run_pipeline`), and every figure is computed from the
forecasts topic with NAB's scoring (:mod:`stream_lstm.tools.nab`):

* the shipped alerts: a detection where an alert event opens (``is_anomaly`` with the
  default false-alarm rate and hold time, as alerts.py opens them), under the standard,
  low-FP and low-FN profiles;
* the alert score, the anomaly likelihood as a surprise ``-log10(1 - anomaly_likelihood)``,
  and for comparison the raw ``max(anomaly_score, drift_score)`` and each score alone, at the
  one corpus threshold NAB's optimiser picks for each profile.

Rows without a forecast (warm-up) have NaN scores and never detect. Probation and windows are
placed on the recording's own rows and timestamps; forecasts are aligned to them by ``ts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stream_lstm import alerts
from stream_lstm.tools import nab, nab_corpus

# The published detectors on the same 19 files (the 2 realKnownCause temperature files and the
# 17 realAWSCloudwatch files), NAB standard profile: NAB's own result files, each at its best
# threshold for these 19 files, as measured by a previous session (issue 15).
PUBLISHED = {"ARTime": 72.6, "Numenta HTM": 71.7, "KNN CAD": 53.9, "Bayesian changepoint": 41.4,
             "random": 21.2}
# The alert score (the likelihood's surprise), the raw score it is built on, and each part alone.
SCORES = ("alert", "raw", "anomaly_score", "drift_score")
PROFILE_NAMES = tuple(nab.PROFILES)                  # standard first


def note(text: str) -> None:
    print(f"evaluate --nab: {text}", file=sys.stderr, flush=True)


def clip_windows(ts: np.ndarray, windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The windows that start within the rows (``--limit`` cuts recordings short).

    >>> clip_windows(np.arange(10.0), [(2.0, 4.0), (8.0, 12.0), (20.0, 30.0)])
    [(2.0, 4.0), (8.0, 12.0)]
    """
    return [(s, e) for s, e in windows if len(ts) and s <= ts[-1]]


def surprise(likelihood: np.ndarray) -> np.ndarray:
    """``-log10(1 - likelihood)``: 4 is a one-in-ten-thousand run for that device.

    >>> surprise(np.array([0.9, 0.9999, np.nan])).round(6).tolist()
    [1.0, 4.0, nan]
    """
    with np.errstate(divide="ignore"):
        return -np.log10(np.maximum(1.0 - likelihood, 1e-300))


def nab_inputs(ts: np.ndarray, forecasts: list[dict], hold_s: float,
               false_alarm_rate: float) -> dict[str, np.ndarray]:
    """Per-row scores from one recording's forecasts, aligned by ``ts``: ``anomaly_score``,
    ``drift_score``, ``raw`` (their max; NaN where both are), ``alert`` (the likelihood's
    :func:`surprise`), ``shipped`` (1.0 where an alert opened, 0.0 elsewhere, NaN where no
    forecast was published) and ``alert_peak`` (at each opening row, the surprise of that
    alert's peak likelihood; NaN elsewhere), ``corroborated`` (1.0 where the forecast says a
    second view agreed or says nothing of it, 0.0 where it says none did). Alerts open as the worker opens them at
    ``false_alarm_rate``: on two flagged readings in a row, or on one sure and corroborated.

    >>> a = nab_inputs(np.array([0.0, 60.0, 120.0, 180.0]),
    ...                [{"ts": 60.0, "anomaly_score": 2.0, "drift_score": None, "is_anomaly": True,
    ...                  "anomaly_likelihood": 0.9999},
    ...                 {"ts": 120.0, "anomaly_score": 1.0, "drift_score": 9.0, "is_anomaly": True,
    ...                  "anomaly_likelihood": 0.999999},
    ...                 {"ts": 180.0, "anomaly_score": 1.0, "drift_score": 1.0, "is_anomaly": False,
    ...                  "anomaly_likelihood": 0.5}], hold_s=3600.0, false_alarm_rate=1e-3)
    >>> a["raw"].tolist(), a["shipped"].tolist(), a["alert"].round(3).tolist()
    ([nan, 2.0, 9.0, 1.0], [nan, 0.0, 1.0, 0.0], [nan, 4.0, 6.0, 0.301])
    >>> a["alert_peak"].round(3).tolist()
    [nan, nan, 6.0, nan]
    """
    pos = {t: i for i, t in enumerate(ts.tolist())}
    out = {k: np.full(len(ts), np.nan) for k in ("anomaly_score", "drift_score", "alert")}
    published, flagged, lik = np.zeros(len(ts), bool), np.zeros(len(ts), bool), np.full(len(ts), np.nan)
    corroborated = np.ones(len(ts), bool)  # (forecasts from before the field: every reading)
    for f in forecasts:
        i = pos.get(f["ts"])
        if i is None:
            continue
        published[i], flagged[i] = True, bool(f.get("is_anomaly"))
        corroborated[i] = bool(f.get("corroborated", True))
        for k in ("anomaly_score", "drift_score"):
            if f.get(k) is not None:
                out[k][i] = f[k]
        if f.get("anomaly_likelihood") is not None:
            out["alert"][i] = surprise(np.array(f["anomaly_likelihood"]))
            lik[i] = f["anomaly_likelihood"]
    # Where the pager would have been called: the alert events, as the worker opens them.
    sure = flagged & alerts.flags(lik, false_alarm_rate, corroborated)[1]
    opens, peaks = alert_events(ts, published, flagged[None], sure[None], out["alert"], hold_s)
    out["shipped"], out["alert_peak"] = opens[0], peaks[0]
    out["raw"] = np.fmax(out["anomaly_score"], out["drift_score"])
    out["corroborated"] = corroborated.astype(np.float64)
    for k in SCORES:  # an infinite score (a zero scale) is the most anomalous, not "never"
        out[k] = np.where(out[k] == np.inf, np.finfo(np.float64).max, out[k])
    return out


# Surprise thresholds the alert events are swept over: false-alarm rates 1e-2 to 1e-6.
EVENT_THRESHOLDS = np.arange(2.0, 6.01, 0.25)


def alert_events(ts: np.ndarray, published: np.ndarray, flags: np.ndarray, sure: np.ndarray,
                 score: np.ndarray, hold_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The alert events of one recording, as alerts.py opens and closes them, for ``k`` ways
    of flagging its readings at once.

    ``published [rows]``: rows with a forecast (the others are skipped); ``flags [k, rows]``:
    the flagged readings, and ``sure [k, rows]`` those sure enough to open an alert alone (the
    others open one only on the second flagged reading in a row); ``score [rows]``: what an
    alert's peak is measured in. Returns
    ``opens [k, rows]`` (1.0 where an alert opens, 0.0 elsewhere, NaN where nothing was
    published) and ``peaks [k, rows]`` (at each opening row, that alert's peak score).

    >>> opens, peaks = alert_events(np.array([0.0, 600, 1200, 1500, 1800]), np.array([False, True, True, True, True]),
    ...                             np.array([[False, True, False, True, True]]),
    ...                             np.array([[False, True, False, False, False]]),
    ...                             np.array([np.nan, 5.0, 3.0, 4.0, 3.5]), hold_s=500.0)
    >>> opens.tolist(), peaks.tolist()  # row 1 sure alone; rows 3 and 4 two in a row
    ([[nan, 1.0, 0.0, 0.0, 1.0]], [[nan, 5.0, nan, nan, 4.0]])
    """
    k = len(flags)
    state = np.tile(alerts.initial_state(), (k, 1))
    opens, peaks = np.full((k, len(ts)), np.nan), np.full((k, len(ts)), np.nan)
    opened_at = np.zeros(k, np.int64)
    nothing = np.zeros(k)
    for i in np.flatnonzero(published).tolist():
        opened, closed = alerts.step(state, ts=np.full(k, ts[i]), flagged=flags[:, i], sure=sure[:, i],
                                     lik=np.full(k, score[i]), value=nothing, low=nothing,
                                     high=nothing, hold_s=hold_s)
        peaks[closed, opened_at[closed]] = state[closed, alerts.PEAK]
        alerts.clear(state, closed)
        opens[:, i] = 0.0
        opens[opened, i] = 1.0
        opened_at[opened] = i
    still = np.flatnonzero(alerts.is_open(state))  # open at the end of the recording
    peaks[still, opened_at[still]] = state[still, alerts.PEAK]
    return opens, peaks


def windows_in_top_alerts(ts: np.ndarray, alert_peak: np.ndarray, windows: list[tuple[float, float]],
                          top: int = 10) -> int:
    """How many of ``windows`` hold the start of one of the ``top`` alerts with the highest
    peaks: what an operator who looks at a recording's ten worst alerts would have found.

    >>> windows_in_top_alerts(np.arange(6.0), np.array([9, np.nan, 1, np.nan, 5, 7.0]),
    ...                       [(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)], top=2)
    2
    """
    rows = np.flatnonzero(np.isfinite(alert_peak))
    best = rows[np.argsort(-alert_peak[rows], kind="stable")[:top]]
    return sum(any(start <= ts[r] <= end for r in best) for start, end in windows)


def _corpus(c: nab_corpus.CorpusScore) -> dict[str, Any]:
    return {"score": c.score, "threshold": c.threshold, "raw": c.raw, "null": c.null,
            "perfect": c.perfect, "files": {n: dataclasses.asdict(f) for n, f in c.files.items()}}


def nab_report(recordings: Mapping[str, Mapping[str, Any]], hold_s: float = 3600.0) -> dict[str, Any]:
    """The NAB scores of a corpus: the shipped alerts and the swept scores, under every profile.

    Parameters
    ----------
    recordings
        ``name -> {"ts", "windows", "shipped", *SCORES}``:
        the rows' timestamps, NAB's ``(start, end)`` windows, and per-row arrays as from
        :func:`nab_inputs` (NaN: no forecast, never a detection).

    hold_s
        The alerts' hold time, for the alert events swept over :data:`EVENT_THRESHOLDS`.

    Returns
    -------
    ``{"shipped": {profile: corpus}, "swept": {score: {profile: corpus}},
    "swept_events": {profile: corpus}, "published": ...}`` (``swept_events``: alert events
    opened at the best surprise threshold, which is its ``threshold``),
    each *corpus* with its normalised ``score``, ``threshold``, ``raw``, ``null``, ``perfect``
    and per-file :class:`~stream_lstm.tools.nab.FileScore` fields under ``files``.
    """
    def files(key: str) -> dict[str, tuple]:
        return {n: (r["ts"], r[key], r["windows"]) for n, r in recordings.items()}

    report: dict[str, Any] = {"shipped": {}, "swept": {k: {} for k in SCORES}, "swept_events": {}}
    # Alert events at each swept threshold (what a pager receives at each false-alarm rate;
    # a reading is sure alone at SURE of the rate, a surprise -log10(SURE) above it, where it is
    # corroborated).
    above = -np.log10(alerts.SURE)
    opens = {n: alert_events(r["ts"], np.isfinite(r["shipped"]),
                             r["alert"][None, :] >= EVENT_THRESHOLDS[:, None],
                             (r["alert"][None, :] >= EVENT_THRESHOLDS[:, None] + above)
                             & (r.get("corroborated", 1.0) == 1.0), r["alert"], hold_s)[0]
             for n, r in recordings.items()}
    for name in PROFILE_NAMES:
        profile = nab.PROFILES[name]
        report["shipped"][name] = _corpus(nab_corpus.score_corpus(files("shipped"), profile, 1.0))
        for key in SCORES:
            _, corpus = nab_corpus.optimise_threshold(files(key), profile)
            report["swept"][key][name] = _corpus(corpus)
        by_threshold = [nab_corpus.score_corpus({n: (r["ts"], opens[n][j], r["windows"])
                                          for n, r in recordings.items()}, profile, 1.0)
                        for j in range(len(EVENT_THRESHOLDS))]
        best = max(range(len(by_threshold)), key=lambda j: (by_threshold[j].score, j))
        report["swept_events"][name] = _corpus(by_threshold[best]) | {
            "threshold": float(EVENT_THRESHOLDS[best])}
    report["published"] = dict(PUBLISHED)
    return report


def print_nab_table(report: dict[str, Any], shipped_rate: float | None = None) -> None:
    shipped, swept = report["shipped"]["standard"], report["swept"]["alert"]["standard"]
    print(f"{'recording':36} {'windows':>7} | shipped alerts: {'hit':>3} {'miss':>4} {'false':>5} "
          f"{'raw':>7} | swept alert: {'hit':>3} {'miss':>4} {'false':>5} {'raw':>7}")
    for name, f in shipped["files"].items():
        g = swept["files"][name]
        print(f"{name[:36]:36} {f['windows_hit'] + f['windows_missed']:>7} |"
              f"               {f['windows_hit']:>3} {f['windows_missed']:>4} {f['false_alerts']:>5} "
              f"{f['raw']:7.2f} |              {g['windows_hit']:>3} {g['windows_missed']:>4} "
              f"{g['false_alerts']:>5} {g['raw']:7.2f}")
    flag = "alert events opened" + (f", false-alarm rate {shipped_rate:g}"
                                    if shipped_rate is not None else "")
    others = ", ".join(f"{p} {report['shipped'][p]['score']:.1f}" for p in PROFILE_NAMES[1:])
    print(f"NAB score, shipped alerts ({flag}): standard {shipped['score']:.1f} ({others})")
    if "swept_events" in report:
        by = report["swept_events"]
        print("NAB score, swept alert events (opened at surprise >= t, false-alarm rate 10^-t): "
              f"standard {by['standard']['score']:.1f} at t = {by['standard']['threshold']:.2f} ("
              + ", ".join(f"{p} {by[p]['score']:.1f} at {by[p]['threshold']:.2f}"
                          for p in PROFILE_NAMES[1:]) + ")")
    for key, label in (("alert", "swept alert score -log10(1 - anomaly_likelihood)"),
                       ("raw", "swept raw score max(anomaly_score, drift_score)"),
                       ("anomaly_score", "swept anomaly_score alone"),
                       ("drift_score", "swept drift_score alone")):
        by = report["swept"][key]
        others = ", ".join(f"{p} {by[p]['score']:.1f} at {by[p]['threshold']:.3g}"
                           for p in PROFILE_NAMES[1:])
        print(f"NAB score, {label}: standard {by['standard']['score']:.1f} at threshold "
              f"{by['standard']['threshold']:.3g} ({others})")
    scored = len(report["shipped"]["standard"]["files"])  # (the figures are for all 19, every row)
    print("published detectors, standard profile, the same 19 files (NAB's own result files, each "
          "at its best threshold): " + ", ".join(f"{k} {v}" for k, v in report["published"].items())
          + ("" if scored == 19 and not report.get("limit") else
             f" (this run scored {scored} recording(s){', the first rows' * bool(report.get('limit'))}: not comparable)"))
    recs = report.get("recordings", {})
    if recs:  # an operator's view: the windows among each recording's ten highest-peaked alerts
        found = {n: r["windows_in_top10_alerts"] for n, r in recs.items()}
        print(f"windows among each recording's top-10 alerts: {sum(found.values())} of "
              f"{sum(r['windows'] for r in recs.values())}; " + ", ".join(
                  f"{n} {k} of {recs[n]['windows']}" for n, k in found.items() if "temperature" in n))


def plot_nab(out: Path, name: str, rec: Mapping[str, Any], threshold: float,
             shipped_threshold: float | None = None, caption: str = "") -> str:
    """``<name>-nab.png``: the value on top; below, the alert score (the likelihood's surprise,
    log axis) with the swept and shipped thresholds, the labelled windows shaded, the
    probation greyed, the swept detections and the alerts that opened."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, x, score = rec["ts"], rec["x"], rec["alert"]
    dates = ts.astype("datetime64[s]")
    fig, (top, low) = plt.subplots(2, 1, figsize=(13, 5.5), sharex=True,
                                   gridspec_kw={"height_ratios": [1, 1.3]})
    top.plot(dates, x, lw=0.7, color="black")
    top.set_ylabel("value")
    positive = score[np.isfinite(score) & (score > 0)]
    floor = float(positive.min()) if positive.size else 1e-3
    low.plot(dates, np.clip(score, floor, None), lw=0.5, color="tab:purple",
             label="alert score -log10(1 - likelihood)")
    low.set_yscale("log")
    low.axhline(threshold, color="tab:red", lw=1, label=f"swept threshold {threshold:.3g}")
    if shipped_threshold is not None:
        low.axhline(shipped_threshold, color="tab:gray", lw=1, ls="--",
                    label=f"shipped threshold {shipped_threshold:.3g}")
    swept = np.flatnonzero(score >= threshold)
    low.plot(dates[swept], score[swept], "o", ms=3, color="tab:red",
             label=f"swept detections ({len(swept):,} rows)")
    shipped = np.flatnonzero(rec["shipped"] >= 1.0)
    rug = low.get_xaxis_transform()  # x in data, y in axes fractions: a strip along the bottom
    low.plot(dates[shipped], np.full(len(shipped), 0.03), "|", ms=8, color="tab:orange",
             transform=rug, label=f"alerts opened ({len(shipped):,})")
    low.plot(dates[swept], np.full(len(swept), 0.09), "|", ms=8, color="tab:red", transform=rug)
    probation = nab.probation_length(len(ts))
    for ax in (top, low):
        for start, end in rec["windows"]:
            ax.axvspan(np.datetime64(int(start), "s"), np.datetime64(int(end), "s"),
                       color="tab:green", alpha=0.25)
        if probation and len(ts):
            ax.axvspan(dates[0], dates[min(probation, len(ts) - 1)], color="gray", alpha=0.12)
    low.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, borderaxespad=0)
    top.set_title(f"{name}: NAB windows shaded green, probation grey" + (f"\n{caption}" if caption else ""),
                  fontsize=9)
    fig.tight_layout()
    path = out / f"{name}-nab.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def _windows_json(files: list[Path]) -> Path | None:
    """NAB's ``combined_windows.json``, found by walking up from the first CSV."""
    folder = Path(files[0]).resolve().parent
    while folder.name and not (folder / "combined_windows.json").exists():
        folder = folder.parent
    return folder / "combined_windows.json" if (folder / "combined_windows.json").exists() else None


def run_nab(args: argparse.Namespace, settings: Any) -> int:
    """``evaluate --nab``: serve a fresh model, score its alerts with NAB, write the report."""
    import torch

    from stream_lstm.kafka.local_broker import ensure_local_broker
    from stream_lstm.models.serving import fresh_model
    from stream_lstm.tools.replay import ReplayError
    from stream_lstm.tools.through_worker import load, require_readings, run_pipeline

    t0 = time.monotonic()
    try:  # (the recordings first: a mistyped path was "--nab needs combined_windows.json")
        series = load(args.files, args.limit, getattr(args, "time_column", None))
        require_readings(series)
        if (windows_json := _windows_json(args.files)) is None:
            raise ReplayError("--nab needs NAB's combined_windows.json in a folder above the first recording")
        windows = {n: clip_windows(ts, nab.nab_windows(windows_json, n + ".csv"))
                   for n, (ts, _) in series.items()}
    except (ReplayError, KeyError) as exc:  # (a KeyError's own text, not its quoted repr)
        print(f"evaluate: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    note(f"{len(series)} recordings, {sum(len(v[1]) for v in series.values()):,} readings (every "
         f"row), {sum(map(len, windows.values()))} windows from {windows_json}; no pre-training: "
         f"a freshly initialised model")
    torch.manual_seed(0)
    served = fresh_model(settings)
    with ensure_local_broker(settings) as bootstrap:
        s = settings.model_copy(update={"bootstrap_servers": bootstrap})
        forecasts, output_topic = run_pipeline(s, series, served.model, served.spec)
    note("scoring (NAB profiles, threshold sweeps)")
    recordings = {n: {"ts": ts, "x": x, "windows": windows[n]}
                  | nab_inputs(ts, forecasts.get(n, []), settings.alert_hold_s,
                               settings.anomaly_false_alarm_rate)
                  for n, (ts, x) in series.items()}
    try:
        report = nab_report(recordings, settings.alert_hold_s)
    except ValueError as exc:  # e.g. --limit left no scored window in the whole corpus
        # (on your broker, the run's forecasts topic stays: no report names it, so this does)
        kept = f" (the run's forecasts stay in {output_topic} on {bootstrap})" \
            if bootstrap == settings.bootstrap_servers else ""
        print(f"evaluate: {exc}{kept}", file=sys.stderr)
        return 2
    report |= {"model": served.version, "horizon": served.spec.horizon,
               "hidden_size": served.spec.hidden_size,
               "anomaly_false_alarm_rate": settings.anomaly_false_alarm_rate,
               "alert_hold_s": settings.alert_hold_s, "output_topic": output_topic,
               "bootstrap_servers": bootstrap, "limit": args.limit,
               "recordings": {n: {"rows": len(r["ts"]), "forecasts_read": len(forecasts.get(n, [])),
                                  "windows": len(r["windows"]),
                                  "probation": nab.probation_length(len(r["ts"])),
                                  "windows_in_top10_alerts": windows_in_top_alerts(
                                      r["ts"], r["alert_peak"], r["windows"])}
                              for n, r in recordings.items()},
               "plots": []}
    from stream_lstm.tools.through_worker import plots_available

    can_plot = plots_available()
    if can_plot:
        note(f"plots in {args.out}")
        threshold = report["swept"]["alert"]["standard"]["threshold"]
        for n, r in recordings.items():
            f, g = report["shipped"]["standard"]["files"][n], report["swept"]["alert"]["standard"]["files"][n]
            caption = "; ".join(
                f"{what}: {x['windows_hit']} hit, {x['windows_missed']} missed, {x['false_alerts']} "
                f"false alerts, raw {x['raw']:.2f}" for what, x in (("shipped alerts", f), ("swept", g)))
            shipped_at = float(surprise(np.array(1.0 - settings.anomaly_false_alarm_rate)))
            report["plots"].append(plot_nab(args.out, n, r, threshold, shipped_at, caption))
    report["wall_s"] = time.monotonic() - t0
    (args.out / "nab.json").write_text(json.dumps(report, indent=2))
    print_nab_table(report, settings.anomaly_false_alarm_rate)
    print(f"report: {args.out / 'nab.json'}; plots in {args.out}")
    return 0
