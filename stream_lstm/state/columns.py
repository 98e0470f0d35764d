"""Per-device numeric state, declared once.

Each :class:`Column` is one piece of a device's state: a numpy array with one row per slot
of the :class:`~stream_lstm.state.table.DeviceTable`. Its declaration says its name, shape,
dtype and what a new device starts with; from it alone the table grows, clears, snapshots and
restores the column, the :class:`~stream_lstm.state.snapshot.DeviceSnapshot` carries it (in
``columns``, readable as an attribute of the same name) and the snapshot codec writes it as a
self-describing section (checkpointing/codec.py). Adding a piece of state is one line here (as
a Kafka Streams state store is one declaration); :data:`SCHEMA_ID` changes with it.

Every column is checkpointed: none can be re-derived by replaying the input since the
checkpoint (each folds the device's whole history, or, for ``partition`` and ``last_seen``,
says where the device's state belongs and when it was last seen), so there is no flag for it.

The LSTM state (``h``, ``c``), the normalizer, the rolling window and the experts are not
columns: each has its own module with its own layout and packing.
"""

from __future__ import annotations

import zlib
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
        The table's attribute (``table.<name>[slot]``), the key in a snapshot's ``columns``
        and the name of its section in the snapshot's bytes (at most 255 UTF-8 bytes).
    width
        ``0``: one value a device; ``k``: ``k`` values; ``HORIZON``: one per forecast step.
        A snapshot whose row has another width (the horizon changed, or ``k`` did) restores
        to ``fill``: to change what a column holds, change its name too.
    dtype, fill
        Element type (a numpy float, int, unsigned or bool type), and a new device's value of
        every element; a column absent from a snapshot (written before it existed) restores
        to ``fill``.
    sparse
        Saved only while it differs from ``fill`` (an open alert: most devices have none).
    keep_newer
        On restore, keep the larger of the table's value and the snapshot's (a wall clock
        the table has already moved on).

    Examples
    --------
    >>> import numpy as np
    >>> col = Column("blend_w", width=2, fill=1.0)
    >>> col.rows(3, horizon=12).shape, col.is_fill(np.array([1.0, 1.0]))
    ((3, 2), True)
    """

    name: str
    width: int = 0
    dtype: type = np.float64
    fill: float = _NAN
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

    def absent(self) -> np.ndarray | np.generic:
        """The value a snapshot without this column reads as: the fill (no elements for a
        ``HORIZON`` column: a device without a ring)."""
        if self.width == 0:
            return np.dtype(self.dtype).type(self.fill)
        return np.full(max(self.width, 0), self.fill, self.dtype)


def schema_id(columns: tuple[Column, ...]) -> int:
    """A stable 32-bit fingerprint of the columns' names, dtypes and declared widths (in
    order): what a snapshot's header says it was written under.

    >>> schema_id((Column("a"),)) == schema_id((Column("a", fill=0.0),)), schema_id(()) == 0
    (True, True)
    """
    text = ";".join(f"{c.name}:{np.dtype(c.dtype).str}:{c.width}" for c in columns)
    return zlib.crc32(text.encode())


COLUMNS: tuple[Column, ...] = (
    Column("last_ts"),  # event time of the last applied reading
    Column("step_s"),  # estimated sampling interval (seconds)
    Column("n_seen", dtype=np.int64, fill=0),
    Column("since_reset", dtype=np.int64, fill=0),
    Column("prev_mu"),  # the one-step forecast the next reading is scored against ...
    Column("prev_sigma"),  # ... and its scale b
    # The H-step forecasts (location, scale b, the model's own normalized change) of the
    # device's last H readings, a ring indexed by reading count: what a reading's drift score
    # compares it with. The location in float64, as the readings: in float32 a device at 1e8
    # with a noise of 0.1 (or at 1e12 with 1) has forecasts rounded by more than its noise, and
    # its drift score and H-step interval measured the rounding. The scale and the normalized
    # change are magnitudes: float32 is plenty for them.
    Column("drift_mu", width=HORIZON),
    Column("drift_b", width=HORIZON, dtype=np.float32),
    Column("drift_change", width=HORIZON, dtype=np.float32),
    Column("prev_change"),  # the model's one-step change
    # Weight of the model's change against persistence at h=1 and h=H (forecast.py).
    Column("blend_w", width=2, fill=1.0),
    # Log of the factor on the model's scale b at h=1 and h=H, so intervals cover what they
    # claim (forecast.py).
    Column("interval_log_m", width=2, fill=0.0),
    # The model of the device's own scores behind its anomaly likelihood (likelihood.py).
    Column("likelihood", width=len(likelihood.FIELDS), fill=0.0),
    # The lowest and highest reading it has shown, for the likelihood's range rule.
    Column("value_range", width=len(likelihood.RANGE_FIELDS)),
    Column("range_held", sparse=True),  # a reading held out of it until the next confirms it
    Column("last_value"),  # the last reading the state took in (a glitch's stand-in; ingest.py)
    # Its open alert, if any (alerts.py).
    Column("alert", width=len(alerts.FIELDS), sparse=True),
    Column("partition", dtype=np.int64, fill=0),
    Column("last_seen", fill=0.0, keep_newer=True),  # wall clock, for the TTL
)

SCHEMA_ID = schema_id(COLUMNS)
"""The state schema this version writes (in each snapshot's header; checkpointing/codec.py)."""
