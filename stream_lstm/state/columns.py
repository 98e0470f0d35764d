"""Per-device numeric state, declared once.

Each :class:`Column` is one piece of a device's state: a numpy array with one row per slot
of the :class:`~stream_lstm.state.table.DeviceTable`. Its declaration says its shape, dtype,
what a new device starts with and how it is saved in the device's snapshot; the table grows,
clears, snapshots and restores every column from this list alone, so adding a piece of state
is one line here (as a Kafka Streams state store is one declaration).

The LSTM state (``h``, ``c``), the normalizer, the rolling window and the experts are not
columns: each has its own module with its own layout and packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream_lstm import alerts, likelihood

HORIZON = -1  # a width that follows the served model's horizon
_NAN = float("nan")


@dataclass(frozen=True)
class Column:
    """One piece of per-device state.

    Parameters
    ----------
    name
        The table's attribute (``table.<name>[slot]``) and, for ``field`` columns, the
        :class:`~stream_lstm.state.snapshot.DeviceSnapshot` attribute of the same name.
    width
        ``0``: one value a device; ``k``: ``k`` values; ``HORIZON``: one per forecast step.
    dtype, fill
        Element type, and a new device's value of every element.
    extra_keys
        Saved in the snapshot's extras under these keys, one per element (absent from an
        older snapshot: ``fill``). Empty: saved as the snapshot field ``name``.
    sparse
        Saved only while it differs from ``fill`` (an open alert: most devices have none).
    keep_newer
        On restore, keep the larger of the table's value and the snapshot's (a wall clock
        the table has already moved on).

    Examples
    --------
    >>> import numpy as np
    >>> col = Column("blend_w", width=2, fill=1.0, extra_keys=("blend_w1", "blend_wH"))
    >>> col.rows(3, horizon=12).shape, col.to_extra(np.array([0.5, 1.0]))
    ((3, 2), {'blend_w1': 0.5, 'blend_wH': 1.0})
    """

    name: str
    width: int = 0
    dtype: type = np.float64
    fill: float = _NAN
    extra_keys: tuple[str, ...] = ()
    sparse: bool = False
    keep_newer: bool = False

    def rows(self, n: int, horizon: int) -> np.ndarray:
        """``n`` rows of a new device's value."""
        if self.width == HORIZON:
            return np.full((n, horizon), self.fill, self.dtype)
        return np.full((n, self.width) if self.width else (n,), self.fill, self.dtype)

    def is_fill(self, row: np.ndarray) -> bool:
        """Every element of ``row`` is the column's fill (NaN counts as equal to a NaN fill)."""
        return bool(np.isnan(row).all() if np.isnan(self.fill) else (row == self.fill).all())

    def to_extra(self, row: np.ndarray) -> dict[str, float]:
        """A row as snapshot extras (nothing for a sparse column at its fill)."""
        if self.sparse and self.is_fill(row):
            return {}
        return dict(zip(self.extra_keys, np.atleast_1d(row).tolist(), strict=True))

    def from_extra(self, extra: dict[str, float]) -> list[float] | float:
        values = [extra.get(key, self.fill) for key in self.extra_keys]
        return values if self.width else values[0]


COLUMNS: tuple[Column, ...] = (
    Column("last_ts"),  # event time of the last applied reading
    Column("step_s"),  # estimated sampling interval (seconds)
    Column("n_seen", dtype=np.int64, fill=0),
    Column("since_reset", dtype=np.int64, fill=0),
    Column("prev_mu"),  # the one-step forecast the next reading is scored against ...
    Column("prev_sigma"),  # ... and its scale b
    # The H-step forecasts (location, scale b, the model's own normalized change) of the
    # device's last H readings, a ring indexed by reading count: what a reading's drift score
    # compares it with. float32 is plenty for a score.
    Column("drift_mu", width=HORIZON, dtype=np.float32),
    Column("drift_b", width=HORIZON, dtype=np.float32),
    Column("drift_change", width=HORIZON, dtype=np.float32),
    Column("prev_change", extra_keys=("prev_change",)),  # the model's one-step change
    # Weight of the model's change against persistence at h=1 and h=H (forecast.py).
    Column("blend_w", width=2, fill=1.0, extra_keys=("blend_w1", "blend_wH")),
    # Log of the factor on the model's scale b at h=1 and h=H, so intervals cover what they
    # claim (forecast.py).
    Column("interval_log_m", width=2, fill=0.0, extra_keys=("interval_log_m1", "interval_log_mH")),
    # The model of the device's own scores behind its anomaly likelihood (likelihood.py).
    Column("likelihood", width=len(likelihood.FIELDS), fill=0.0, extra_keys=likelihood.FIELDS),
    # Its open alert, if any (alerts.py).
    Column("alert", width=len(alerts.FIELDS), extra_keys=alerts.FIELDS, sparse=True),
    Column("partition", dtype=np.int64, fill=0),
    Column("last_seen", fill=0.0, keep_newer=True),  # wall clock, for the TTL
)
