"""Per-device anomaly likelihood: how improbable a device's *recent run* of scores is, under
a model of that device's own history of them.

A raw score (``anomaly_score``, ``drift_score``: ``|x - forecast| / b``) means different
things on different devices: a bursty disk-write series scores high on its ordinary bursts,
while a slow slide towards a failure never scores high at one step. So, as in Numenta's
*anomaly likelihood* (S. Ahmad, A. Lavin, S. Purdy, Z. Agha, "Unsupervised real-time anomaly
detection for streaming data", Neurocomputing 262, 2017), each device keeps a model of its
own scores and reports how unusual its recent run is under that model.

Per scored reading::

    e = max(anomaly_score, drift_score)     # the drift score carries slow departures
    r <- r + a_short * (e - r)              # the recent run: a short moving average

The body of the run's distribution is a gamma with the device's running mean ``M`` and
variance ``V`` of ``r`` (moments matched; an average of exponential scores is gamma). Its
tail, which is what a false-alarm rate of one in ten thousand depends on, is modelled by
peaks over a threshold (J. Pickands, "Statistical inference using extreme order
statistics", Ann. Statist. 3, 1975; A. Siffer et al., "Anomaly detection in streams with
extreme value theory", KDD 2017): above ``t = M + 2 sqrt(V)``, which the device's run
exceeds at a tracked rate ``p``, the excesses ``y = r - t`` follow a generalized Pareto
distribution, fitted by the method of moments (J. Hosking & J. Wallis, Technometrics 29,
1987) from their running mean ``m`` and variance ``s2``::

    gamma = (1 - m^2 / s2) / 2,   sigma = m (1 + m^2 / s2) / 2
    P(run > t + y) = p * (1 + gamma * y / sigma) ^ (-1 / gamma)

``likelihood = 1 - P(run >= r)``: the body's gamma below ``t``, the tail above it.
Running statistics use ``a = max(1 / n, 1 / LONG_RUN)``: a plain mean until ``n`` reaches
``LONG_RUN``, so a new device learns quickly, then an exponential forgetting of about two
days of 5-minute readings. Because the statistics are of the run ``r`` itself, a device's
autocorrelated scores are inside its model rather than a source of false alarms.

A device has three such channels (:func:`judge`): its scores; its level's distance from its
own long-run mean, which catches a value far outside anything the device has shown even
when the forecaster followed it there step by step; and the size of its steps, which
catches a device that moves more, or more often, than it used to. The rarest decides, each
tail divided by its channel's share of the false-alarm budget (:data:`WEIGHTS`, a weighted
Bonferroni: the shares sum to one) so that the stated rate still holds.

Besides the channels, a reading outside the whole range the device has ever shown, widened by
:data:`RANGE_TOLERANCE` of it on each side, is anomalous by definition (:func:`beyond_range`,
:func:`overrule`): a new extreme of that size is what Numenta's NAB detector calls a *spatial
anomaly* (Ahmad et al. 2017, above), and what no model of runs can tell from a burst in a
device's first days. On stationary noise such records grow rarer as the range fills: past a
device's first 3,000 readings, 2e-6 of Gaussian readings, 6e-5 of log-normal ones and 1e-4 of
Student-t ones with 3 degrees of freedom (tests/test_likelihood.py), a tenth of the default
rate at most; on the 19 NAB recordings the rule catches one more labelled window with no more
false alerts (docs/evaluation.md).

The likelihood is computed against the model *before* it learns from the reading, and only
once the device has ``WARMUP`` scored readings (NaN before). A reading is flagged when
``1 - likelihood <= false_alarm_rate``: on a device whose scores behave as they did, that is
that fraction of its readings, whatever its noise level or the shape of its scores
(tests/test_likelihood.py checks within a factor of 2 at 1e-2 to 1e-4).

>>> import numpy as np
>>> state = np.tile(channel_state(), (2, 1))
>>> rng = np.random.default_rng(0)
>>> for _ in range(400):  # two devices, one a hundred times noisier than the other
...     lik = update(state, rng.exponential([1.0, 100.0]))
>>> bool(np.all((lik > 0) & (lik < 1)))
True
>>> lik = update(state, np.array([1.0, 5000.0]))  # a burst only on the noisy one, in its units
>>> bool(lik[1] > 0.999 and lik[0] < 0.99)
True
"""

from __future__ import annotations

import numpy as np
import torch

SHORT_RUN = 8  # readings in the recent run (span of its moving average)
LONG_RUN = 500  # readings the device's model of its runs covers (~2 days at 5 min)
WARMUP = 100  # scored readings before a device's likelihood is published
TAIL_MIN = 10  # excesses over the threshold before the tail model replaces the gamma
TAIL_Z = 2.0  # the threshold, in standard deviations of the run above its mean

# Weight of a reading in the level's long-run mean: about LONG_RUN readings, as the channels'
# models. Measured on the NAB recordings (docs/evaluation.md): 1e-3 (twice as long) 57.5
# shipped, 2e-3 59.4, anything from 2e-3 to 1e-2 within 0.3 of it.
LEVEL_RATE = 0.002
# Evidence is capped at this many times the channel's usual run (or at 1e12 before it has
# one): an infinite or absurd score is already certain, and more would only swamp the
# device's model of its runs for weeks.
EVIDENCE_CAP = 1e4
# A change smaller than this, relative to the readings it is between, is none: the producer's
# float arithmetic (0.1 + 0.2 for 0.3), not the device. After a device held one value for weeks
# its channels had only ever seen 0, so one such ulp opened an alert at likelihood 1.
SAME_RELATIVE = 1e-12
# A change smaller than this in absolute terms is none either: its square, which the channels'
# variances are made of, would underflow to 0 and leave them "never varied" (a device reading
# 1e-200 flagged half its readings).
SAME_ABSOLUTE = 1e-140
# To a channel that has only seen no change (its mean is 0: a device that held one value), any
# change is certain: one in the 11th digit of a constant reading opened an alert. For it, a
# change within this much of the reading, below any sensor's resolution (a float32's last bit
# is 6e-8 of it), is none; a larger one is news.
RESOLUTION = 1e-9

# Columns of one channel's model: the run, its mean and variance, readings counted, the rate
# of excesses over the threshold, their mean and variance, and how many there were.
CHANNEL_FIELDS = ("run", "mean", "var", "n", "p", "xmean", "xvar", "xn")
RUN, MEAN, VAR, COUNT, RATE, XMEAN, XVAR, XCOUNT = range(len(CHANNEL_FIELDS))
# A device's columns, in the table and in its snapshot: the channels of its scores, its level
# and its steps, then the level's long-run mean, variance and count, and the last reading.
CHANNELS = ("score", "level", "step")
FIELDS = (*(f"lik_{c}_{f}" for c in CHANNELS for f in CHANNEL_FIELDS),
          "lik_value_mean", "lik_value_var", "lik_value_n", "lik_value_prev")
# Each channel's share of the false-alarm budget. The scores' extremes are rarely subtle (a
# broken forecast scores in the hundreds), so they need little of it; the level and the
# steps, where slow and spread-out departures show, get the rest. Measured on the 19 NAB
# recordings (docs/evaluation.md): equal shares 54.0 shipped, these 57.5, with fewer false
# alerts (52 -> 47); the scores' share anywhere from 1/9 down to 1/200 gives about the same.
WEIGHTS = (1 / 9, 4 / 9, 4 / 9)
LEVEL_MU, LEVEL_VAR, LEVEL_N, PREVIOUS = range(len(CHANNELS) * len(CHANNEL_FIELDS), len(FIELDS))


# The range rule: a reading beyond the device's lowest and highest readings by more than this
# fraction of their difference, once it has RANGE_WARMUP readings, has a likelihood of at least
# 1 - RANGE_TAIL. Measured on the NAB recordings (docs/evaluation.md): 0.05 to 0.15 all within
# 0.3 of each other, 0.2 and wider catch nothing the channels miss.
RANGE_TOLERANCE = 0.1
RANGE_TAIL = 1e-7
RANGE_WARMUP = WARMUP
# A device's range columns: lowest and highest reading, readings seen (NaN, the fill: none).
RANGE_FIELDS = ("range_low", "range_high", "range_n")
# A reading beyond the range by more than this many times its width (a sensor's glitch: 1e12,
# -9999) is not taken into the range until the next reading is clearly out on its side too:
# one glitch would otherwise widen the range for good, and the rule would never fire on that
# device again. On the NAB recordings this changes nothing at 10 (3: 61.9 shipped, not 64.5).
RANGE_ABSURD = 10.0
RANGE_CONFIRM = 1.0  # widths past the range, on its side, a held reading's next confirms it by
# A reading opens an alert alone (alerts.SURE) only where a second view agrees with the one that
# found it extreme: another channel's tail within this fraction of its share, or the range rule
# (alerts.flags). One channel alone still flags the reading; its alert waits for the next.
# On the 19 NAB recordings (docs/evaluation.md) 0.03 to 0.3 all give 65.0-65.8 shipped (64.5
# without): of the 31 false alerts, 19 were one channel alone, of the 27 windows hit, 5.
CORROBORATION = 0.1


def initial_state() -> np.ndarray:
    """A device that has never been judged: ``float64 [len(FIELDS)]``."""
    return np.zeros(len(FIELDS), np.float64)


def judge(state: np.ndarray, score: np.ndarray, value: np.ndarray) -> np.ndarray:
    """One reading per row: its anomaly likelihood from all channels (state in place).

    The *score* channel is the run of ``score`` (``max(anomaly_score, drift_score)``). The
    *level* channel is the run of ``|value - m| / s``, the reading's distance from the
    device's own long-run mean ``m`` in its long-run standard deviations ``s`` (weight
    ``LEVEL_RATE``): a value far outside anything the device has shown for days, which a
    forecaster that follows the value step by step scores as ordinary. The *step* channel
    is the run of ``|value - previous value|``: a device whose readings move more, or more
    often, than they used to (denser bursts, a noisier sensor), even where each move is
    forecast well enough. The reading is as unlikely as the rarest of the three, each tail
    divided by its channel's share :data:`WEIGHTS` (a weighted Bonferroni), so that
    ``1 - likelihood <= rate`` still flags at most
    ``rate`` of ordinary readings.

    Parameters
    ----------
    state
        ``float64 [rows, len(FIELDS)]``, one distinct device per row.
    score
        ``[rows]``; NaN where the reading was not scored: no likelihood, and neither
        channel learns (the level's mean does).
    value
        ``[rows]``: the reading, in the device's units.
    """
    return combine(conclude(*observe(state, score, value)))


def observe(state: np.ndarray, score: np.ndarray, value: np.ndarray) -> Observed:
    """:func:`judge`'s recursion alone: fold each row's reading into all three channels (state
    in place) and return what the likelihood is then computed from (:func:`conclude`,
    :func:`combine`), ``[rows, 3, ...]``. Only this part is sequential: a poll of many rounds
    observes round by round and concludes once for all of them (``alerts.judge``)."""
    n = state[:, LEVEL_N]
    seen_before = n >= 1  # (n is a view: after the update below it counts this reading too)
    a = np.maximum(1.0 / (n + 1.0), LEVEL_RATE)
    mu, var = _running(state[:, LEVEL_MU], state[:, LEVEL_VAR], value, a)
    state[:, LEVEL_MU], state[:, LEVEL_VAR], state[:, LEVEL_N] = mu, var, n + 1.0
    # The reading is part of the statistics it is measured with, as the normalizer does: the
    # distance is then at most ~1 / sqrt(a), never thousands while the mean knows little.
    spread = np.maximum(np.sqrt(var), 1e-9 * np.maximum(np.abs(mu), 1.0))
    scored = np.isfinite(score)
    evidence = np.empty((len(state), len(CHANNELS)))
    evidence[:, 0] = score
    width = len(CHANNELS) * len(CHANNEL_FIELDS)
    floor = np.where(state[:, :width].reshape(len(state), len(CHANNELS), -1)[:, :, MEAN] == 0.0, RESOLUTION, 0.0)
    distance, step = changed(value, mu, floor[:, 1]), changed(value, state[:, PREVIOUS], floor[:, 2])
    evidence[:, 1] = np.where(seen_before & scored, distance / spread, np.nan)
    # No step before a previous reading (a fresh state's is a fill, an older snapshot's NaN): one
    # |value - 0| of a device reading 2.4e9 had every ordinary step flagged for a week (a review).
    evidence[:, 2] = np.where(seen_before & scored, step, np.nan)
    state[:, PREVIOUS] = value
    channels = state[:, :width].reshape(len(state), len(CHANNELS), len(CHANNEL_FIELDS))
    observed = advance(channels, evidence)
    state[:, :width] = channels.reshape(len(state), width)  # a no-op where the view was one
    return observed


def changed(value: np.ndarray, before: np.ndarray, relative: float | np.ndarray = 0.0) -> np.ndarray:
    """``|value - before|``, or 0 where that is within :data:`SAME_RELATIVE` (or ``relative``,
    if larger) of them or :data:`SAME_ABSOLUTE`: no change a device made.

    >>> changed(np.array([0.1 + 0.2, 0.31, 1e-200, 2e-100]), np.array([0.3, 0.3, 2e-200, 1e-100])).tolist()
    [0.0, 0.010000000000000009, 0.0, 1e-100]
    """
    diff = np.abs(value - before)
    same = diff <= np.maximum(np.maximum(SAME_RELATIVE, relative) * np.fmax(np.abs(value), np.abs(before)), SAME_ABSOLUTE)
    return np.where(same, 0.0, diff)


def combine(lik: np.ndarray) -> np.ndarray:
    """``[rows]``: the likelihood of the rarest channel of ``lik`` (``[rows, 3]``), each tail
    divided by its channel's share of the false-alarm budget; NaN where the scores were not
    judged."""
    tail_score, t_level, t_step = (1.0 - lik[:, i] for i in range(len(CHANNELS)))
    w_score, w_level, w_step = WEIGHTS
    tail = np.minimum(1.0, np.fmin(tail_score / w_score, np.fmin(t_level / w_level, t_step / w_step)))
    return np.where(np.isfinite(tail_score), 1.0 - tail, np.nan)


def corroborated(lik: np.ndarray) -> np.ndarray:
    """``[rows]`` bool: at least two of a reading's channels (``lik``, ``[rows, 3]``, before
    :func:`combine`) have a tail within :data:`CORROBORATION` of their share of the budget.

    >>> corroborated(np.array([[1 - 1e-9, 0.5, 0.99], [1 - 1e-9, 0.5, 0.5], [np.nan] * 3])).tolist()
    [True, False, False]
    """
    with np.errstate(invalid="ignore"):
        return np.sum((1.0 - lik) / np.array(WEIGHTS) <= CORROBORATION, axis=-1) >= 2


def beyond_range(state: np.ndarray, value: np.ndarray, held: np.ndarray) -> np.ndarray:
    """``[rows]``: whether each reading lies outside its device's range so far, widened by
    :data:`RANGE_TOLERANCE` of it each way (the range then takes the reading in; state in
    place). A device with fewer than :data:`RANGE_WARMUP` readings, or whose readings never
    differed, has no range to leave. A reading past the range by :data:`RANGE_ABSURD` times
    its width is *held* out of it: taken in, with the held one, only if the next reading is
    past the range on its side by :data:`RANGE_CONFIRM` widths and a tenth of the held one's
    distance (a new regime), else forgotten (a glitch).

    Parameters
    ----------
    state
        ``float64 [rows, len(RANGE_FIELDS)]``, one distinct device per row; NaN for a new one.
    value
        ``[rows]``: the reading, in the device's units.
    held
        ``float64 [rows]``: each device's held reading, NaN for none (in place).

    >>> state, held = np.full((1, len(RANGE_FIELDS)), np.nan), np.full(1, np.nan)
    >>> for v in np.linspace(0.0, 10.0, RANGE_WARMUP):
    ...     _ = beyond_range(state, np.array([v]), held)
    >>> beyond_range(state, np.array([10.9]), held), beyond_range(state, np.array([12.1]), held)
    (array([False]), array([ True]))
    >>> state.tolist()  # 12.1 is 10% of 10.9 past the range: taken in
    [[0.0, 12.1, 102.0]]
    >>> beyond_range(state, np.array([1e12]), held), float(state[0, 1]), held  # a glitch: held out
    (array([ True]), 12.1, array([1.e+12]))
    >>> beyond_range(state, np.array([5.0]), held), float(state[0, 1]), held  # and forgotten
    (array([False]), 12.1, array([nan]))
    """
    low, high, n = state[:, 0], state[:, 1], np.nan_to_num(state[:, 2])
    width = high - low
    with np.errstate(invalid="ignore"):
        ranged = (n >= RANGE_WARMUP) & (width > 0)
        outside = ranged & ((value > high + RANGE_TOLERANCE * width) | (value < low - RANGE_TOLERANCE * width))
        absurd = ranged & ((value > high + RANGE_ABSURD * width) | (value < low - RANGE_ABSURD * width))
    had = np.isfinite(held)
    # Confirmed only by a reading a width past the range on its side, and a tenth as far: one
    # just outside took a glitch into the range for good (later ones then not held: forecasts
    # ruined, a review). NAB's one held reading (12 widths out) is confirmed by its next (2.3).
    with np.errstate(invalid="ignore"):
        up = np.fmax(RANGE_CONFIRM * width, (held - high) / RANGE_ABSURD)
        down = np.fmax(RANGE_CONFIRM * width, (low - held) / RANGE_ABSURD)
        confirms = had & (((held > high) & (value > high + up)) | ((held < low) & (value < low - down)))
    hold = absurd & ~confirms  # (a second glitch that does not confirm the first is held instead)
    taken = np.where(hold, np.nan, value)
    confirmed = np.where(confirms, held, np.nan)  # the held reading, confirmed by this one
    state[:, 0] = np.fmin(np.fmin(low, taken), confirmed)
    state[:, 1] = np.fmax(np.fmax(high, taken), confirmed)
    state[:, 2] = n + 1.0
    held[:] = np.where(hold, value, np.nan)
    return outside


def overrule(lik: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """``lik`` with the readings :func:`beyond_range` found outside raised to at least
    ``1 - RANGE_TAIL``; NaN (not judged yet) stays NaN.

    >>> overrule(np.array([0.5, 0.5, np.nan]), np.array([False, True, True])).tolist()
    [0.5, 0.9999999, nan]
    """
    return np.where(outside & np.isfinite(lik), np.fmax(lik, 1.0 - RANGE_TAIL), lik)


def channel_state() -> np.ndarray:
    """One channel that has never been scored: ``float64 [len(CHANNEL_FIELDS)]``."""
    return np.zeros(len(CHANNEL_FIELDS), np.float64)


def update(state: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """Fold one reading's evidence per row into ``state`` (in place); return the likelihood.

    Parameters
    ----------
    state
        ``float64 [rows, len(CHANNEL_FIELDS)]``, one channel of one distinct device per row.
    evidence
        ``[rows]``, e.g. ``max(anomaly_score, drift_score)``; NaN where the reading was not
        scored (warm-up): its row neither learns nor gets a likelihood.

    Returns ``[rows]`` likelihoods in [0, 1], NaN where not scored or still warming up.
    """
    return conclude(*advance(state, evidence))


# What a channel's likelihood is computed from, per row: its state before the reading, the run
# after it, the threshold, and whether it is judged (scored, past the warm-up).
Observed = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def advance(state: np.ndarray, evidence: np.ndarray) -> Observed:
    """:func:`update`'s recursion alone (state in place, ``[..., len(CHANNEL_FIELDS)]``);
    :func:`conclude` turns what it returns into the likelihoods."""
    before = state.copy()
    scored = ~np.isnan(evidence)
    n = before[..., COUNT]
    mean, var = before[..., MEAN], before[..., VAR]
    cap = np.where(mean > 0, EVIDENCE_CAP * mean, 1e12)
    e = np.minimum(np.where(scored, evidence, 0.0), cap)
    run = np.where(n > 0, before[..., RUN] + (2.0 / (SHORT_RUN + 1)) * (e - before[..., RUN]), e)
    threshold = mean + TAIL_Z * np.sqrt(var)

    a = np.maximum(1.0 / (n + 1.0), 1.0 / LONG_RUN)
    state[..., RUN], state[..., COUNT] = run, n + 1.0
    state[..., MEAN], state[..., VAR] = _running(mean, var, run, a)
    over = run > threshold
    state[..., RATE] = before[..., RATE] + a * (over - before[..., RATE])
    # Excesses learn at the rate they come: about one in TAIL_Z's tail of the readings.
    xn = before[..., XCOUNT]
    ax = np.maximum(1.0 / (xn + 1.0), 1.0 / (LONG_RUN * 0.05))
    xmean, xvar = _running(before[..., XMEAN], before[..., XVAR], run - threshold, ax)
    learns_tail = scored & over & (n > 0)
    state[..., XMEAN] = np.where(learns_tail, xmean, before[..., XMEAN])
    state[..., XVAR] = np.where(learns_tail, xvar, before[..., XVAR])
    state[..., XCOUNT] = xn + learns_tail
    if not scored.all():
        state[~scored] = before[~scored]
    return before, run, threshold, scored & (n >= WARMUP)


def conclude(before: np.ndarray, run: np.ndarray, threshold: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """The likelihoods (any shape) of what :func:`advance` returned; NaN where not judged."""
    return np.where(judged, 1.0 - _survival(run, threshold, before), np.nan)


def _running(mean: np.ndarray, var: np.ndarray, x: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exponentially weighted mean and variance after ``x`` (West, Comm. ACM 22, 1979)."""
    delta = x - mean
    return mean + a * delta, (1.0 - a) * (var + a * delta * delta)


def _survival(run: np.ndarray, threshold: np.ndarray, state: np.ndarray) -> np.ndarray:
    """``P(run' >= run)`` under each device's model: gamma body, generalized Pareto tail."""
    body = 1.0 - gamma_cdf(run, state[..., MEAN], state[..., VAR])
    rate, m, s2 = state[..., RATE], state[..., XMEAN], state[..., XVAR]
    ok = (state[..., XCOUNT] >= TAIL_MIN) & (m > 0) & (s2 > 0)
    ratio = np.where(ok, m * m / np.where(ok, s2, 1.0), 1.0)
    # Shapes outside [-1/2, 1/2) have no finite variance or moment estimate: clip.
    shape = np.clip(0.5 * (1.0 - ratio), -0.5, 0.45)
    sigma = np.where(ok, 0.5 * m * (1.0 + ratio), 1.0)
    y = np.maximum(run - threshold, 0.0) / sigma
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        pareto = np.where(np.abs(shape) > 1e-6,
                          np.maximum(1.0 + shape * y, 0.0) ** (-1.0 / shape), np.exp(-y))
    tail = rate * pareto
    return np.where(ok & (run > threshold), tail, np.where(ok, np.maximum(body, rate), body))


def gamma_cdf(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``P(X <= x)`` for ``X`` gamma-distributed with the given mean and variance.

    Shape ``k = mean^2 / var``, scale ``theta = var / mean``. A device whose runs never varied
    (``var`` 0) gives 1 above its mean and 0 at or below it.
    """
    x, mean, var = (np.asarray(a, np.float64) for a in (x, mean, var))
    ok = (mean > 0) & (var > 0)
    k = np.where(ok, mean * mean / np.where(ok, var, 1.0), 1.0)
    theta = np.where(ok, var / np.where(ok, mean, 1.0), 1.0)
    # torch has the regularized incomplete gamma function (numpy has not): P(k, x / theta).
    p = torch.special.gammainc(torch.from_numpy(k), torch.from_numpy(np.maximum(x, 0.0) / theta)).numpy()
    return np.where(ok, p, (x > mean).astype(np.float64))
