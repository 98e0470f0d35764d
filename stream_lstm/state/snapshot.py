"""DeviceSnapshot: everything the service knows about one device, as plain values.

This is the unit that leaves memory: it is what the changelog topic and the local state
store hold, and what eviction and restore move between the in-memory table and disk.

The declared columns (state/columns.py) travel in ``columns``, one entry a column, with no
attribute written out here for any of them: each declared column is also readable and
settable as the attribute of its name (``snap.n_seen``), generated from the declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_lstm.state.columns import COLUMNS, SCHEMA_ID, Column


@dataclass
class DeviceSnapshot:
    """One device's state.

    Parameters
    ----------
    device_id
        The device key.
    h, c
        LSTM state, ``float32 [num_layers, hidden_size]``.
    count
        Readings folded into the normalizer (Welford ``n``; for EWM the number seen).
    mean, var
        Normalizer statistics per channel, ``float64 [n_features]``.
    window
        The last readings in arrival order, oldest first, ``float32 [n <= W, n_features]``.
    model_version
        Version of the model whose weights produced ``h``/``c``.
    experts
        The per-device one-step experts and their weights (``stream_lstm.experts``), packed
        by ``experts.pack``: ``float64 [PACKED_SIZE]``; empty when none.
    columns
        The declared columns' rows by name (state/columns.py): a numpy scalar for a width-0
        column, a 1-D array otherwise, in the column's dtype. A column left out (a sparse one
        at its fill, or one the writer did not have) restores to its fill; one the reader
        does not declare is ignored. Each column of ``COLUMNS`` is also the attribute of its
        name: ``snap.partition``, ``snap.n_seen``, ``snap.drift_mu``... (a width-0 one as a
        plain ``int``/``float``; an absent one reads as its fill, a ``HORIZON`` one then as
        no elements); setting the attribute sets the entry, in the column's dtype.
    schema
        The :data:`~stream_lstm.state.columns.SCHEMA_ID` of the columns it was taken under
        (0 for a format-1 snapshot, from before schemas).

    Examples
    --------
    >>> import numpy as np
    >>> s = DeviceSnapshot.empty("pump-1", num_layers=1, hidden_size=4, n_features=2, partition=3)
    >>> s.h.shape, s.window.shape, s.mean.dtype, s.partition
    ((1, 4), (0, 2), dtype('float64'), 3)
    >>> s.n_seen = 7
    >>> s.columns["n_seen"].dtype, s.n_seen, s.blend_w.tolist(), len(s.drift_mu)
    (dtype('int64'), 7, [1.0, 1.0], 0)
    """

    device_id: str
    h: np.ndarray
    c: np.ndarray
    count: float
    mean: np.ndarray
    var: np.ndarray
    window: np.ndarray
    model_version: str = ""
    experts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    columns: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_ID

    @classmethod
    def empty(
        cls, device_id: str, *, num_layers: int, hidden_size: int, n_features: int, partition: int = 0
    ) -> DeviceSnapshot:
        """The state of a device never seen before."""
        snap = cls(
            device_id=device_id,
            h=np.zeros((num_layers, hidden_size), np.float32),
            c=np.zeros((num_layers, hidden_size), np.float32),
            count=0.0,
            mean=np.zeros(n_features, np.float64),
            var=np.zeros(n_features, np.float64),
            window=np.zeros((0, n_features), np.float32),
        )
        snap.partition = partition
        return snap


def _column_attribute(col: Column) -> property:
    name, scalar = col.name, col.width == 0
    kind = np.dtype(col.dtype).type

    def get(self: DeviceSnapshot) -> Any:
        value = self.columns.get(name)
        if value is None:
            value = col.absent()
        return value.item() if scalar and isinstance(value, np.generic | np.ndarray) else value

    def put(self: DeviceSnapshot, value: Any) -> None:
        self.columns[name] = kind(value) if scalar else np.asarray(value, kind)

    return property(get, put, doc=f"The declared column ``{name}`` (``columns[{name!r}]``).")


for _col in COLUMNS:
    if hasattr(DeviceSnapshot, _col.name):
        raise TypeError(f"column {_col.name!r} would hide DeviceSnapshot.{_col.name}")
    setattr(DeviceSnapshot, _col.name, _column_attribute(_col))
del _col
