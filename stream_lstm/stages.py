"""The forecast as an ordered list of stages.

The fleet model is one network for every device. Each stage shapes the forecast for one
device from that device's own readings, and owns the per-device state it learns (declared as
columns in ``state/columns.py``, or, for the experts, ``state/expert_state.py``). In the
order they run:

1. :class:`Blend`: the model's change against persistence (``STREAM_LSTM_BLEND_RATE``);
2. :class:`Experts`: the per-device one-step experts (``STREAM_LSTM_EXPERT_RATE``);
3. :class:`Calibration`: the interval's width (``STREAM_LSTM_INTERVAL_ADAPT_RATE``);
4. :class:`Scores`: each reading's anomaly and drift scores, and the memory of the published
   forecasts that later readings are scored against.

The first three are corrections, and optional: ``STREAM_LSTM_FORECAST_STAGES`` lists those
that run (all by default; empty: the model's forecast alone). Scores is not optional (every
reading is scored, every published forecast remembered), so it is not in that list, but it
is a stage of the same pipeline: ``forecast.assemble`` always runs it, last, so that it
remembers the forecast as the corrections left it. ``assemble`` runs the stages round by
round (a device at most once a round), in three phases, each over all the stages in order:
``recall`` (what earlier forecasts said about this reading), ``learn`` (from this reading),
``predict`` (shape the new forecast). Every ``recall`` comes before any ``learn``, so what
Scores recalls (``Round.expected_1``...) is there for the corrections to learn from. Before
the rounds, a stage may ``prepare`` what it needs from the readings and the model's outputs
alone, once for the whole poll (a backlog's many rounds at once; ``Round.prepared``).

A new correction is one class here: a :class:`Stage` subclass that declares its ``name`` (the
word ``STREAM_LSTM_FORECAST_STAGES`` lists it by) and, if it has parameters, how
``from_settings`` builds it (plus any setting or state column of its own). Its place among
the named classes of this module is its place in the order: the registry :data:`STAGES`, the
order ``config``'s validator enforces, the setting's default and its documentation all derive
from the classes. ``config`` imports this module, so it imports nothing of the package at run
time but the experts (``experts.py``, ``state/expert_state.py``: numpy only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from stream_lstm import experts

# The round the stages see (rounds.py); the names stay importable from here.
from stream_lstm.rounds import RECALLED, SCORED, Round, between, example_round, pair  # noqa: F401

if TYPE_CHECKING:  # config imports the registry from here: no import back at run time
    from stream_lstm.config import Settings
    from stream_lstm.state.ingest import StepBatch
    from stream_lstm.state.table import DeviceTable


STAGES: dict[str, type[Stage]] = {}
"""The optional stages by name, in the order they run: every :class:`Stage` subclass that
declares a ``name``, in the order the classes were defined."""


class Stage:
    """A step of the forecast, for each device. Every phase is optional.

    ``columns`` names the table state the stage owns: it alone reads and writes it. A subclass that
    declares a ``name`` is an optional stage (:data:`STAGES`), built by ``from_settings``.

    >>> list(STAGES)  # the optional stages, in the order they run
    ['blend', 'experts', 'calibration']
    """

    name: ClassVar[str] = ""
    columns: ClassVar[tuple[str, ...]] = ()
    # The settings only this stage reads: given while it is left out of
    # STREAM_LSTM_FORECAST_STAGES, they would do nothing, so the settings refuse them.
    own_settings: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name", "")
        if name:
            if name in STAGES:
                raise ValueError(f"two stages named {name!r}: {STAGES[name].__name__}, {cls.__name__}")
            STAGES[name] = cls

    @classmethod
    def from_settings(cls, settings: Settings, q: float) -> Stage:
        """The stage as ``settings`` configure it (``q``: the intervals' Laplace quantile)."""
        return cls()

    def prepare(self, batch: StepBatch, mu: np.ndarray, table: DeviceTable) -> dict[str, np.ndarray]:
        """Per-row values (batch row order) that depend on the readings and the model's output
        alone, not on what any stage learns in this poll: computed once for the whole poll (a
        backlog's many rounds at once), each round sees its rows in ``Round.prepared``."""
        return {}

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
    made for it, ``mu`` being the model's change in that forecast (which the blend remembers,
    ``prev_change`` and the ring ``drift_change``)::

        w <- clip(w + rate * sign(x - forecast) * mu, 0, 1)

    A device where the model helps keeps ``w`` near 1; one where it hurts drifts towards
    persistence. Steps 2..H-1 interpolate ``w``.

    Parameters
    ----------
    rate
        The step (``STREAM_LSTM_BLEND_RATE``).

    >>> from stream_lstm.state.table import DeviceTable
    >>> table = DeviceTable(2, 4, 1, 1, 8)
    >>> table.ensure_horizon(2)
    >>> slot = table.slots_for(["pump"], [0], now=0.0)
    >>> table.prev_change[slot] = 1.0  # the model said "up by 1 (normalized)" ...
    >>> r = example_round(slot, x=10.0, expected_1=11.0)  # ... and the reading stayed at 10
    >>> Blend(rate=0.1).learn(r, table)
    >>> table.blend_w[slot, 0].tolist()  # less of the model's change next time
    [0.9]
    """

    name = "blend"
    columns = ("blend_w", "prev_change", "drift_change")
    own_settings = ("blend_rate",)

    def __init__(self, rate: float) -> None:
        self.rate = rate

    @classmethod
    def from_settings(cls, settings: Settings, q: float) -> Blend:
        return cls(settings.blend_rate)

    def learn(self, r: Round, table: DeviceTable) -> None:
        slots = r.slots
        model_1 = r.expected_1 if r.model_1 is None else r.model_1
        # Both columns at once: the one-step forecast's, then the H-step one's.
        blended, change = pair(model_1, r.expected_h), pair(table.prev_change[slots], table.drift_change[slots, r.pos])
        step = self.rate * np.sign(r.x[:, None] - blended) * change
        step = np.where(pair(r.scored_1, r.scored_h) & np.isfinite(step), step, 0.0)
        table.blend_w[slots] = np.clip(table.blend_w[slots] + step, 0.0, 1.0)

    def predict(self, r: Round, table: DeviceTable) -> None:
        r.forecast = r.x[:, None] + r.change * between(table.blend_w[r.slots], r.along)
        # The model's own change in this forecast: what the readings it is for learn against.
        table.prev_change[r.slots], table.drift_change[r.slots, r.pos] = r.mu[:, 0], r.mu[:, -1]


class Experts(Stage):
    """The per-device one-step experts (``experts.py``) replace the one-step forecast; their
    correction fades linearly to nothing at h=H, so the H-step forecast stays the blended
    model's.

    Parameters
    ----------
    rate
        The step of the experts' weights (``STREAM_LSTM_EXPERT_RATE``).

    >>> from stream_lstm.state.table import DeviceTable
    >>> table = DeviceTable(2, 4, 1, 1, 8)
    >>> slot = table.slots_for(["pump"], [0], now=0.0)
    >>> r = example_round(slot, x=10.0, expected_1=np.nan)
    >>> stage = Experts(rate=0.1)
    >>> stage.recall(r, table); stage.predict(r, table)
    >>> r.forecast[0, 0].item()  # nothing learnt yet: every expert says 10
    10.0
    """

    name = "experts"
    columns = ("experts",)
    own_settings = ("expert_rate",)

    def __init__(self, rate: float) -> None:
        self.rate = rate

    @classmethod
    def from_settings(cls, settings: Settings, q: float) -> Experts:
        return cls(settings.expert_rate)

    def prepare(self, batch: StepBatch, mu: np.ndarray, table: DeviceTable) -> dict[str, np.ndarray]:
        # A poll of one round computes them inside step(), as cheaply: only several rounds
        # (a device's history moves on within the poll) gain from doing it once.
        if len(batch.rounds) < 2 or not table.with_experts:
            return {}
        analog, median, feats = experts.prepare(table.experts, batch.slots, batch.x_taken,
                                                batch.mean_target, batch.scale_target, mu[:, 0])
        return {"experts_analog": analog, "experts_median": median, "experts_feats": feats}

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
        p = r.prepared
        one = experts.step(state, r.scored_1, r.x, r.mean, r.scale, r.mu[:, 0], r.forecast[:, 0],
                           rate=self.rate, prepared=(p["experts_analog"], p["experts_median"],
                                                     p["experts_feats"]) if "experts_feats" in p else None)
        table.experts[r.slots] = state
        r.forecast += (one - r.forecast[:, 0])[:, None] * (1.0 - r.along)


LOG_M_BOUND = float(np.log(1000.0))  # the interval factor stays within 1/1000 to 1000


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

    >>> from stream_lstm.state.table import DeviceTable
    >>> table = DeviceTable(2, 4, 1, 1, 8)
    >>> slot = table.slots_for(["pump"], [0], now=0.0)
    >>> r = example_round(slot, x=20.0, expected_1=10.0)  # far outside [10 -/+ 2.3]
    >>> Calibration(rate=0.1, coverage=0.9, q=2.303).learn(r, table)
    >>> round(table.interval_log_m[slot, 0].item(), 3)  # the one-step interval widens
    0.09
    """

    name = "calibration"
    columns = ("interval_log_m",)
    own_settings = ("interval_adapt_rate",)

    def __init__(self, rate: float, coverage: float, q: float) -> None:
        self.rate, self.coverage, self.q = rate, coverage, q

    @classmethod
    def from_settings(cls, settings: Settings, q: float) -> Calibration:
        return cls(settings.interval_adapt_rate, settings.interval_coverage, q)

    def learn(self, r: Round, table: DeviceTable) -> None:
        # Both columns at once: the one-step forecast's, then the H-step one's.
        miss = np.abs(r.x[:, None] - pair(r.expected_1, r.expected_h)) > self.q * pair(r.b_1, r.b_h)
        log_m = table.interval_log_m[r.slots] + np.where(
            pair(r.scored_1, r.scored_h), self.rate * (miss - (1.0 - self.coverage)), 0.0)
        # Bounded: on a flat spell a forecast that is exactly right shrinks the factor every
        # reading, and unbounded it reached widths of 1e-15 that then covered nothing for
        # ~2,000 readings of the next noise (each miss only climbs back by rate x coverage).
        table.interval_log_m[r.slots] = np.clip(log_m, -LOG_M_BOUND, LOG_M_BOUND)

    def predict(self, r: Round, table: DeviceTable) -> None:
        r.b = r.b * np.exp(between(table.interval_log_m[r.slots], r.along))


class Scores(Stage):
    """Each reading's scores against the forecasts published for it, and the memory of the
    forecast published now, for the readings it is for. Not optional (no ``name``): it runs
    after every correction, so it remembers the forecast as they left it.

    A reading is scored against the one-step forecast made for it at the previous reading
    (``prev_mu``, ``prev_sigma``): ``anomaly_score = |x - forecast_1| / b_1`` (both in the
    device's units). Under a calibrated Laplace, a score of at least ``s`` has probability
    ``exp(-s)``: 4.6 is one reading in 100, 6.9 one in 1,000.

    A one-step forecast follows a slow departure (a machine cooling over hours) step by step,
    so its residuals stay small. Each reading is therefore also scored against the forecast
    made for it H readings earlier, kept in a ring of the last H readings' H-step forecasts
    (``drift_mu``, ``drift_b``, slot ``n_seen % H``): ``drift_score = |x - forecast_H| / b_H``,
    which grows with a sustained departure. On NAB's machine-temperature recording the drift
    score puts all ten of its highest values inside the labelled failure windows, the
    one-step score two (docs/evaluation.md). A device's first readings after a reset (or
    ever) are not scored (NaN; ``Round.scored_1``), since their hidden state is not yet
    informative, and the drift score waits H readings more (``Round.scored_h``). The residual
    ``x - forecast_1`` is NaN only at a reset. Whether a reading is anomalous is judged from
    both scores against the device's own history of them, after the stages (alerts.judge,
    likelihood.py).

    >>> from stream_lstm.state.table import DeviceTable
    >>> table = DeviceTable(2, 4, 1, 1, 8)
    >>> table.ensure_horizon(2)
    >>> slot = table.slots_for(["pump"], [0], now=0.0)
    >>> table.prev_mu[slot], table.prev_sigma[slot] = 10.0, 2.0  # "10, Laplace scale 2"
    >>> r = example_round(slot, x=18.0, expected_1=np.nan)  # ... and the reading is 18
    >>> stage = Scores()
    >>> stage.recall(r, table); stage.learn(r, table)
    >>> r.anomaly_score.tolist()  # 8 away at scale 2: at least this, one reading in e^4 (55)
    [4.0]
    >>> stage.predict(r, table); table.prev_mu[slot].tolist()  # what the next reading meets
    [18.0]
    """

    columns = ("prev_mu", "prev_sigma", "drift_mu", "drift_b")

    def recall(self, r: Round, table: DeviceTable) -> None:
        slots, pos = r.slots, r.pos
        r.expected_1, r.b_1 = table.prev_mu[slots], table.prev_sigma[slots]
        r.expected_h = table.drift_mu[slots, pos].astype(np.float64)
        r.b_h = table.drift_b[slots, pos].astype(np.float64)

    def learn(self, r: Round, table: DeviceTable) -> None:
        x = r.actual  # (as it came: a glitch the state did not take in is scored all the same)
        r.residual = np.where(r.reset, np.nan, x - r.expected_1)
        with np.errstate(invalid="ignore", divide="ignore"):
            r.anomaly_score = np.where(r.scored_1, np.abs(r.residual) / r.b_1, np.nan)
            r.drift_score = np.where(r.scored_h, np.abs(x - r.expected_h) / r.b_h, np.nan)
        r.drift_expected = np.where(r.scored_h, r.expected_h, np.nan)

    def predict(self, r: Round, table: DeviceTable) -> None:
        slots, pos = r.slots, r.pos
        table.prev_mu[slots], table.prev_sigma[slots] = r.forecast[:, 0], r.b[:, 0]
        table.drift_mu[slots, pos], table.drift_b[slots, pos] = r.forecast[:, -1], r.b[:, -1]


def stages_for(settings: Settings, q: float) -> list[Stage]:
    """The optional stages ``settings`` list (``STREAM_LSTM_FORECAST_STAGES``), in order;
    ``q`` is the intervals' Laplace quantile.

    >>> from stream_lstm.config import Settings
    >>> [type(s).__name__ for s in stages_for(Settings(forecast_stages="blend,calibration"), q=2.3)]
    ['Blend', 'Calibration']
    """
    return [STAGES[name].from_settings(settings, q) for name in settings.stage_names]
