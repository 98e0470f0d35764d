"""Alert events: one record when a device's alert opens, one when it closes.

A pager wants incidents, not flagged readings. A device's alert **opens** when its anomaly
likelihood reaches the threshold (``1 - likelihood <= rate``) at two readings in a row, or at
one reading that is sure on its own (``1 - likelihood <= rate * SURE``, and *corroborated*: two
channels of the likelihood agree, or the range rule, :func:`~stream_lstm.likelihood.corroborated`;
published as the forecast's ``corroborated``): a single marginal flag *arms* the device,
and its next reading opens the alert if flagged too, else disarms it (Prometheus' alerting
rules wait the same way, ``for:``, before they fire). The alert **closes** at the first reading
after the likelihood has stayed below the threshold for ``hold_s`` seconds of event time. An
alert that opened on its second reading starts at the first (its ``alert_since``), and its peak
counts both. While open, it keeps the peak likelihood and the value and expected range at the
peak. Its id, ``<device>@<start ms>``, is the same in both events and across restarts (the
state moves with the device), so a pager deduplicates on it.

This is the model Prometheus' Alertmanager and on-call tools expect: a firing alert, then a
resolved one, with a stable identity.

>>> import numpy as np
>>> state = np.tile(initial_state(), (1, 1))
>>> def reading(ts, lik, sure=False):
...     return step(state, ts=np.array([ts]), flagged=np.array([lik >= 0.999]), lik=np.array([lik]),
...                 sure=np.array([sure]), value=np.array([5.0]), low=np.array([0.0]),
...                 high=np.array([1.0]), hold_s=60.0)
>>> reading(0.0, 0.9995)  # flagged once: armed, nothing opens
(array([], dtype=int64), array([], dtype=int64))
>>> reading(10.0, 0.9999)  # flagged again: the alert opens, from the first flag
(array([0]), array([], dtype=int64))
>>> alert_id("pump-1", state[0, SINCE]), float(state[0, PEAK])
('pump-1@0', 0.9999)
>>> reading(120.0, 0.5)[1]  # 60 s below the threshold: closed
array([0])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stream_lstm import likelihood

if TYPE_CHECKING:  # the state layer declares its columns from here: no import back up at run time
    from stream_lstm.forecast import ForecastBatch
    from stream_lstm.state.ingest import StepBatch
    from stream_lstm.state.table import DeviceTable

# Columns of a device's alert state, in the table and (while open) in its snapshot: when the
# alert started (NaN: none open), when the likelihood last reached the threshold, the peak
# likelihood and when, and the value and expected range at the peak.
FIELDS = ("alert_since", "alert_last_above", "alert_peak", "alert_peak_ts",
          "alert_value", "alert_low", "alert_high")
SINCE, LAST_ABOVE, PEAK, PEAK_TS, VALUE, LOW, HIGH = range(len(FIELDS))
# A flagged reading whose tail is at most this fraction of the false-alarm rate opens an alert
# alone; one less sure must be followed by another. On the 19 NAB recordings (docs/evaluation.md)
# this cut false alerts from 52 to 31 and kept every window hit: alone, 1/10 and 1/1000 of the
# rate within 0.4 points of it; with no reading sure on its own, 9 of the 27 windows were lost.
SURE = 0.01


def initial_state() -> np.ndarray:
    """No alert open: ``float64 [len(FIELDS)]`` of NaN."""
    return np.full(len(FIELDS), np.nan)


def flags(lik: np.ndarray, false_alarm_rate: float, corroborated: np.ndarray | bool = True
          ) -> tuple[np.ndarray, np.ndarray]:
    """``(flagged, sure)`` per reading of likelihood ``lik``: past the threshold
    (``1 - lik <= false_alarm_rate``), and sure enough to open an alert alone (:data:`SURE`
    of the rate, where ``corroborated``). A reading not judged (NaN) is neither.

    >>> flags(np.array([0.5, 0.9995, 0.999999, 0.999999, np.nan]), 1e-3,
    ...       np.array([True, True, True, False, False]))
    (array([False,  True,  True,  True, False]), array([False, False,  True, False, False]))
    """
    tail = 1.0 - np.nan_to_num(lik, nan=0.0)
    return tail <= false_alarm_rate, (tail <= false_alarm_rate * SURE) & corroborated


def is_open(state: np.ndarray) -> np.ndarray:
    """``[rows]`` bool: the device has an open alert."""
    return np.isfinite(state[:, SINCE])


def is_armed(state: np.ndarray) -> np.ndarray:
    """``[rows]`` bool: the device's last reading was flagged, and no alert is open yet."""
    return ~is_open(state) & np.isfinite(state[:, LAST_ABOVE])


def alert_id(device_id: str, since: float) -> str:
    """The alert's stable id: the device and its start time in epoch milliseconds."""
    return f"{device_id}@{int(round(since * 1000))}"


def step(state: np.ndarray, *, ts: np.ndarray, flagged: np.ndarray, lik: np.ndarray, sure: np.ndarray,
         value: np.ndarray, low: np.ndarray, high: np.ndarray, hold_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Advance each row's alert by one reading (in place); return the rows that opened and
    the rows that closed.

    Parameters
    ----------
    state
        ``float64 [rows, len(FIELDS)]``, one distinct device per row.
    ts
        The reading's event time (epoch seconds).
    flagged
        The reading's likelihood reached the threshold.
    lik
        Its likelihood (NaN when not scored).
    sure
        The reading is flagged with evidence enough to open an alert alone (:data:`SURE`).
    value, low, high
        The reading and the range it was expected in.
    hold_s
        Seconds of event time below the threshold before an open alert closes.

    A closed row keeps its last state until the caller has read it; call :func:`clear`
    on the closed rows afterwards.
    """
    was_open, armed = is_open(state), is_armed(state)
    opened = flagged & ~was_open & (sure | armed)
    state[~was_open & ~flagged] = np.nan  # an armed device's next reading was calm: disarmed
    state[opened, SINCE] = np.where(armed[opened], state[opened, LAST_ABOVE], ts[opened])
    state[flagged & ~was_open & ~armed, PEAK] = -np.inf  # a first flag: the peak starts here
    peak = flagged & (lik > state[:, PEAK])
    for col, new in ((PEAK, lik), (PEAK_TS, ts), (VALUE, value), (LOW, low), (HIGH, high)):
        state[peak, col] = new[peak]
    state[flagged, LAST_ABOVE] = ts[flagged]
    closed = was_open & ~flagged & (ts - state[:, LAST_ABOVE] >= hold_s)
    return np.flatnonzero(opened), np.flatnonzero(closed)


def clear(state: np.ndarray, rows: np.ndarray) -> None:
    """Forget the alerts of ``rows`` (after their close events are out)."""
    state[rows] = np.nan


def judge(batch: StepBatch, fb: ForecastBatch, table: DeviceTable, *,
          false_alarm_rate: float, hold_s: float, ts: np.ndarray) -> list[tuple[int, str, np.ndarray]]:
    """The forecast stage after :func:`~stream_lstm.forecast.assemble`: each reading's anomaly
    likelihood and flag (set on ``fb``), and the alert events they cause.

    Parameters
    ----------
    batch, fb
        The stepped batch and its forecasts (``fb.anomaly_likelihood`` and ``fb.is_anomaly``
        are filled in here).
    table
        Device state: the likelihood model and the alert of each device are read and updated.
    false_alarm_rate
        A reading is flagged when ``1 - likelihood <= false_alarm_rate``.
    hold_s
        Seconds of event time below the threshold before an alert closes.
    ts
        ``[m]`` event time of each accepted reading (batch row order).

    Returns ``(row, "open" | "close", alert state)`` per event, in reading order.
    """
    evidence = np.fmax(fb.anomaly_score, fb.drift_score)  # NaN only where neither was scored
    # The range of whichever forecast the reading departed from more: one-step or H-step.
    low_1, high_1, low_h, high_h = fb.expected_range()
    one_step = ~(np.nan_to_num(fb.drift_score, nan=-1.0) > np.nan_to_num(fb.anomaly_score, nan=-1.0))
    q_low, q_high = np.where(one_step, low_1, low_h), np.where(one_step, high_1, high_h)
    events: list[tuple[int, str, np.ndarray]] = []
    x, slots_all, n = batch.x_target, batch.slots, len(batch)
    # Round by round, a device's readings in one poll are observed in order (the recursion);
    # their likelihoods then come from what was observed, for every round at once.
    before = np.empty((n, len(likelihood.CHANNELS), len(likelihood.CHANNEL_FIELDS)))
    run, threshold = np.empty((n, len(likelihood.CHANNELS))), np.empty((n, len(likelihood.CHANNELS)))
    judged = np.empty((n, len(likelihood.CHANNELS)), bool)
    for start, end in batch.rounds:
        slots = slots_all[start:end]
        state = table.likelihood[slots]
        (before[start:end], run[start:end], threshold[start:end],
         judged[start:end]) = likelihood.observe(state, evidence[start:end], x[start:end])
        if (glitch := batch.glitch[start:end]).any():  # judged as it came, but not learnt from
            state[glitch] = table.likelihood[slots[glitch]]
        table.likelihood[slots] = state
    # (the range each reading is judged against is the state's: ingest.py tracks it)
    channels = likelihood.conclude(before, run, threshold, judged)
    lik = likelihood.overrule(likelihood.combine(channels), batch.outside)
    # A reading one channel alone finds extreme is flagged, but its alert waits for the next
    # flagged reading: sure alone only where a second view agrees.
    agreed = (likelihood.corroborated(channels) | batch.outside) & np.isfinite(lik)
    flagged, sure = flags(lik, false_alarm_rate, agreed)
    # Only a device with an alert open or armed, or a reading flagged in this poll, has alert
    # work: for any other, step() changes nothing and reports nothing.
    waiting = np.isfinite(table.alert[slots_all, LAST_ABOVE])  # open or armed
    active = np.isin(slots_all, np.union1d(slots_all[flagged], slots_all[waiting]))
    if not active.any():
        rounds: list[tuple[int, int]] = []
    elif active.all():
        rounds = batch.rounds
    else:
        rounds = [(start, end) for start, end in batch.rounds if active[start:end].any()]
    for start, end in rounds:
        rows = np.arange(start, end) if active[start:end].all() else start + np.flatnonzero(active[start:end])
        slots = slots_all[rows]
        alert = table.alert[slots]
        opened, closed = step(alert, ts=ts[rows], flagged=flagged[rows], lik=lik[rows], sure=sure[rows],
                              value=x[rows], low=q_low[rows], high=q_high[rows], hold_s=hold_s)
        for i in sorted([*opened.tolist(), *closed.tolist()]):
            events.append((int(rows[i]), "open" if i in opened else "close", alert[i].copy()))
        clear(alert, closed)
        table.alert[slots] = alert
    fb.anomaly_likelihood, fb.is_anomaly, fb.corroborated = lik, flagged, agreed
    return events
