"""The forecast's per-device corrections, as an ordered list of stages.

The fleet model is one network for every device. Each stage corrects its forecast for one
device from that device's own readings, and owns the per-device state it learns (declared as
columns in ``state/columns.py``, or, for the experts, ``state/expert_state.py``):

1. :class:`Blend`: the model's change against persistence (``STREAM_LSTM_BLEND_RATE``);
2. :class:`Experts`: the per-device one-step experts (``STREAM_LSTM_EXPERT_RATE``);
3. :class:`Calibration`: the interval's width (``STREAM_LSTM_INTERVAL_ADAPT_RATE``).

``STREAM_LSTM_FORECAST_STAGES`` lists them (all three by default; empty: the model's forecast
alone). ``forecast.assemble`` runs them round by round (a device at most once a round), in
three phases, each over the stages in order: ``recall`` (what earlier forecasts said about
this reading), ``learn`` (from this reading), ``predict`` (shape the new forecast). A new
correction is one class here, its name in ``config.STAGE_ORDER`` and :func:`stages_for`, and
its rate setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream_lstm import experts
from stream_lstm.state.table import DeviceTable


def between(ends: np.ndarray, along: np.ndarray) -> np.ndarray:
    """``[rows, H]``: per-row values at h=1 and h=H (``ends[:, 0]``, ``ends[:, 1]``),
    linearly interpolated over the steps in between.

    >>> between(np.array([[1.0, 0.0]]), np.array([0.0, 0.5, 1.0])).tolist()
    [[1.0, 0.5, 0.0]]
    """
    return ends[:, :1] + along * (ends[:, 1:] - ends[:, :1])


@dataclass
class Round:
    """One round of readings, as the stages see it: arrays of one row per reading.

    ``forecast`` and ``b`` start as the model's (``x + change``, its Laplace scale, device
    units) and leave as what is published; ``model_1`` is the model's own (blended) one-step
    forecast that was made for this reading, which the blend learns from.
    """

    slots: np.ndarray  # [r] table slots
    x: np.ndarray  # [r] the reading (target channel, device units)
    mean: np.ndarray  # [r] the normalizer's mean there ...
    scale: np.ndarray  # [r] ... and scale
    mu: np.ndarray  # [r, H] the model's change, normalized
    change: np.ndarray  # [r, H] the same in device units
    along: np.ndarray  # [H] where each step lies between h=1 (0) and h=H (1)
    pos: np.ndarray  # [r] the ring slot of the forecast made H readings ago
    scored_1: np.ndarray  # [r] bool: past the warm-up, so the one-step forecast counts
    scored_h: np.ndarray  # [r] bool: the same for the H-step forecast
    expected_1: np.ndarray  # [r] the one-step forecast made for this reading ...
    b_1: np.ndarray  # [r] ... and its scale
    expected_h: np.ndarray  # [r] the H-step forecast made for this reading ...
    b_h: np.ndarray  # [r] ... and its scale
    forecast: np.ndarray  # [r, H]
    b: np.ndarray  # [r, H]
    model_1: np.ndarray = field(default=None)  # type: ignore[assignment]
    experts_state: np.ndarray | None = None  # the experts' rows, read once a round

    def __post_init__(self) -> None:
        if self.model_1 is None:
            self.model_1 = self.expected_1  # without experts, the published one-step forecast


class Stage:
    """A per-device correction of the forecast. Every phase is optional.

    ``columns`` names the table state the stage owns: it alone reads and writes it."""

    columns: tuple[str, ...] = ()

    def recall(self, r: Round, table: DeviceTable) -> None:
        """Read what this reading needs from the stage's state (before any stage learns)."""

    def learn(self, r: Round, table: DeviceTable) -> None:
        """Learn from the reading ``r.x`` about the forecasts made for it."""

    def predict(self, r: Round, table: DeviceTable) -> None:
        """Correct ``r.forecast`` or ``r.b``, the forecast made at this reading."""


class Blend(Stage):
    """A per-device weight ``w`` in [0, 1] for the model's change: ``forecast = x + w * change``.

    On some devices the fleet model's change is worse than no change at all (persistence,
    the last value). ``w`` is learnt by online gradient descent on the absolute error (M.
    Zinkevich, "Online convex programming and generalized infinitesimal gradient ascent",
    ICML 2003) when a reading arrives, for the one-step forecast and for the H-step forecast
    made for it, ``mu`` being the model's change in that forecast::

        w <- clip(w + rate * sign(x - forecast) * mu, 0, 1)

    A device where the model helps keeps ``w`` near 1; one where it hurts drifts towards
    persistence. Steps 2..H-1 interpolate ``w``.

    Parameters
    ----------
    rate
        The step (``STREAM_LSTM_BLEND_RATE``).

    >>> table = DeviceTable(2, 4, 1, 1, 8)
    >>> table.ensure_horizon(2)
    >>> slot = table.slots_for(["pump"], [0], now=0.0)
    >>> table.prev_change[slot] = 1.0  # the model said "up by 1 (normalized)" ...
    >>> r = example_round(slot, x=10.0, expected_1=11.0)  # ... and the reading stayed at 10
    >>> Blend(rate=0.1).learn(r, table)
    >>> table.blend_w[slot, 0].tolist()  # less of the model's change next time
    [0.9]
    """

    columns = ("blend_w",)

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def learn(self, r: Round, table: DeviceTable) -> None:
        slots = r.slots
        for col, blended, change, scored in (
                (0, r.model_1, table.prev_change[slots], r.scored_1),
                (1, r.expected_h, table.drift_change[slots, r.pos], r.scored_h)):
            step = self.rate * np.sign(r.x - blended) * change
            step = np.where(scored & np.isfinite(step), step, 0.0)
            table.blend_w[slots, col] = np.clip(table.blend_w[slots, col] + step, 0.0, 1.0)

    def predict(self, r: Round, table: DeviceTable) -> None:
        r.forecast = r.x[:, None] + r.change * between(table.blend_w[r.slots], r.along)


class Experts(Stage):
    """The per-device one-step experts (``experts.py``) replace the one-step forecast; their
    correction fades linearly to nothing at h=H, so the H-step forecast stays the blended
    model's.

    Parameters
    ----------
    rate
        The step of the experts' weights (``STREAM_LSTM_EXPERT_RATE``).

    >>> table = DeviceTable(2, 4, 1, 1, 8)
    >>> slot = table.slots_for(["pump"], [0], now=0.0)
    >>> r = example_round(slot, x=10.0, expected_1=np.nan)
    >>> stage = Experts(rate=0.1)
    >>> stage.recall(r, table); stage.predict(r, table)
    >>> r.forecast[0, 0].item()  # nothing learnt yet: every expert says 10
    10.0
    """

    columns = ("experts",)

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def recall(self, r: Round, table: DeviceTable) -> None:
        if not table.with_experts:
            raise ValueError("the experts stage needs a DeviceTable built with_experts=True")
        # Copied once a round: read here, stepped and written back in predict.
        r.experts_state = table.experts[r.slots]
        # The model's own one-step forecast: the published one was the experts'.
        r.model_1 = experts.previous(r.experts_state, "model")

    def predict(self, r: Round, table: DeviceTable) -> None:
        state = r.experts_state
        assert state is not None
        one = experts.step(state, r.scored_1, r.x, r.mean, r.scale, r.mu[:, 0], r.forecast[:, 0],
                           rate=self.rate)
        table.experts[r.slots] = state
        r.forecast += (one - r.forecast[:, 0])[:, None] * (1.0 - r.along)


class Calibration(Stage):
    """A per-device factor ``m`` on the model's scale, so intervals cover what they claim.

    The model's scale is one network's judgement for the whole fleet (Gibbs & Candes,
    "Adaptive conformal inference under distribution shift", NeurIPS 2021; Angelopoulos,
    Candes & Tibshirani, "Conformal PID control", NeurIPS 2023). When a reading arrives, for
    the one-step forecast and for the H-step forecast made for it::

        log_m <- log_m + rate * (missed - (1 - coverage))

    where ``missed`` is 1 if the reading fell outside that forecast's interval. An interval
    that misses too often widens, one that never misses narrows. Steps 2..H-1 interpolate.

    Parameters
    ----------
    rate
        The step (``STREAM_LSTM_INTERVAL_ADAPT_RATE``).
    coverage
        The intervals' nominal coverage (``STREAM_LSTM_INTERVAL_COVERAGE``).
    q
        Their Laplace quantile: an interval is ``forecast -/+ q * b``.

    >>> table = DeviceTable(2, 4, 1, 1, 8)
    >>> slot = table.slots_for(["pump"], [0], now=0.0)
    >>> r = example_round(slot, x=20.0, expected_1=10.0)  # far outside [10 -/+ 2.3]
    >>> Calibration(rate=0.1, coverage=0.9, q=2.303).learn(r, table)
    >>> round(table.interval_log_m[slot, 0].item(), 3)  # the one-step interval widens
    0.09
    """

    columns = ("interval_log_m",)

    def __init__(self, rate: float, coverage: float, q: float) -> None:
        self.rate, self.coverage, self.q = rate, coverage, q

    def learn(self, r: Round, table: DeviceTable) -> None:
        slots = r.slots
        for col, expected, spread, scored in ((0, r.expected_1, r.b_1, r.scored_1),
                                              (1, r.expected_h, r.b_h, r.scored_h)):
            miss = np.abs(r.x - expected) > self.q * spread
            table.interval_log_m[slots, col] += np.where(
                scored, self.rate * (miss - (1.0 - self.coverage)), 0.0)

    def predict(self, r: Round, table: DeviceTable) -> None:
        r.b = r.b * np.exp(between(table.interval_log_m[r.slots], r.along))


def stages_for(names: tuple[str, ...] | list[str], *, blend_rate: float, expert_rate: float,
               adapt_rate: float, coverage: float, q: float) -> list[Stage]:
    """The stages ``names`` lists (``STREAM_LSTM_FORECAST_STAGES``), in that order.

    >>> [type(s).__name__ for s in stages_for(("blend", "calibration"), blend_rate=0.01,
    ...                                        expert_rate=0.1, adapt_rate=0.02, coverage=0.9, q=2.3)]
    ['Blend', 'Calibration']
    """
    make = {"blend": lambda: Blend(blend_rate), "experts": lambda: Experts(expert_rate),
            "calibration": lambda: Calibration(adapt_rate, coverage, q)}
    return [make[name]() for name in names]


def example_round(slots: np.ndarray, x: float, expected_1: float, horizon: int = 2) -> Round:
    """A one-reading round for the examples: the model says "no change", scale 1, scored."""
    one = np.ones(1)
    return Round(
        slots=slots, x=one * x, mean=one * x, scale=one, mu=np.zeros((1, horizon), np.float32),
        change=np.zeros((1, horizon)), along=np.linspace(0.0, 1.0, horizon), pos=np.zeros(1, np.int64),
        scored_1=np.ones(1, bool), scored_h=np.zeros(1, bool), expected_1=one * expected_1,
        b_1=one, expected_h=one * np.nan, b_h=one * np.nan, forecast=np.full((1, horizon), x),
        b=np.ones((1, horizon)),
    )
