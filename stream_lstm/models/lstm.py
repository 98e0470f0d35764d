"""SimpleLSTM: the classic LSTM forecaster, with a step method for serving.

The network is ``nn.LSTM`` followed by a linear head, exactly like the textbook
``SimpleLSTM``. Two things are specific to streaming:

* The head is **probabilistic and direct multi-horizon**: for each of the H steps ahead it
  gives a Laplace location ``mu`` and log-scale ``log_b``, trained by the Laplace negative
  log-likelihood ``|y - mu| / b + log b``. Laplace rather than Gaussian because it measured
  better on the shared recordings (docs/evaluation.md): its location is the conditional
  *median*, which minimises the MAE (and so the MASE) forecasts are judged by, and the
  ``|y - mu|`` term does not let the spikes of server metrics drag the forecast the way a
  squared error does (the Gaussian head over-reacted to level jumps and over-covered quiet
  series). A scale rather than quantiles because one number per step gives both the
  interval (any coverage, chosen at serving time) and the anomaly score (residual / b).
* The location is the **change from the last reading**, in normalized units of the target
  channel: ``mu[k] ~ z[t+k+1] - z[t]``. Persistence is then the all-zero output, which a
  fresh model starts near, and the network only has to learn what persistence misses.

``forward`` runs whole sequences (training); ``step`` runs one reading for a batch of
devices whose h/c live outside the module (serving); ``forward_packed`` runs sequences of
different lengths packed together (serving a deep backlog: many readings of few devices in
one poll). All use the same weights, so a sequence run through ``forward`` or
``forward_packed`` equals the same readings fed one by one through ``step``.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

# Keeps exp(log_b) inside a range where the NLL and the intervals stay finite.
LOG_B_MIN, LOG_B_MAX = -7.0, 5.0


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a :class:`SimpleLSTM`; stored beside the weights in the registry.

    Parameters
    ----------
    n_features
        Channels per reading.
    hidden_size
        LSTM hidden units.
    num_layers
        Stacked LSTM layers.
    horizon
        H, the number of steps ahead forecast for the target channel.
    target_channel
        Which input channel is forecast.
    dropout
        Dropout between stacked layers and before the head (training only).

    Examples
    --------
    >>> spec = ModelSpec(hidden_size=8, horizon=3)
    >>> spec.to_dict()
    {'n_features': 1, 'hidden_size': 8, 'num_layers': 1, 'horizon': 3, 'target_channel': 0, 'dropout': 0.0}
    >>> SimpleLSTM.from_spec(spec).lstm.hidden_size
    8
    """

    n_features: int = 1
    hidden_size: int = 64
    num_layers: int = 1
    horizon: int = 12
    target_channel: int = 0
    dropout: float = 0.0

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    def serving_shape(self) -> ModelSpec:
        """This spec without what only training reads (``dropout``): two models of one serving
        shape step the same h/c and forecast the same fields, so a worker may swap between them.

        >>> ModelSpec(dropout=0.1).serving_shape() == ModelSpec().serving_shape()
        True
        """
        return replace(self, dropout=0.0)


# What a model's metadata may ask for: far past any model this service serves, and small
# enough that checking the weights' shapes against it is instant (a models-topic record asking
# for 20,000 layers held the worker's loop for a minute, at every start).
SPEC_LIMITS = {"n_features": 4096, "hidden_size": 65_536, "num_layers": 64, "horizon": 100_000}


def check_spec(spec: ModelSpec) -> None:
    """Raise ``ValueError`` unless ``spec`` is one this service could serve.

    >>> check_spec(ModelSpec(num_layers=20_000))
    Traceback (most recent call last):
    ...
    ValueError: num_layers is 20000: at most 64
    """
    for name, most in SPEC_LIMITS.items():
        value = getattr(spec, name)
        if type(value) is not int or not 1 <= value <= most:
            raise ValueError(f"{name} is {value!r}: at most {most}" if type(value) is int and value > most
                             else f"{name} is {value!r}, not a whole number from 1 to {most}")
    if type(spec.target_channel) is not int or not 0 <= spec.target_channel < spec.n_features:
        raise ValueError(f"target_channel is {spec.target_channel!r}, not a channel of {spec.n_features}")
    if not isinstance(spec.dropout, int | float) or not 0.0 <= spec.dropout < 1.0:
        raise ValueError(f"dropout is {spec.dropout!r}, not in [0, 1)")



class SimpleLSTM(nn.Module):
    """``nn.LSTM`` + linear head giving a Laplace (location, log-scale) per horizon step.

    Parameters
    ----------
    n_features, hidden_size, num_layers, horizon, dropout
        As in :class:`ModelSpec`.

    Examples
    --------
    >>> import torch
    >>> spec = ModelSpec(n_features=1, hidden_size=8, num_layers=1, horizon=3)
    >>> model = SimpleLSTM.from_spec(spec).eval()
    >>> x = torch.randn(2, 5, 1)                       # 2 devices, 5 readings each
    >>> mu, log_b, (h, c) = model(x)
    >>> mu.shape, h.shape
    (torch.Size([2, 5, 3]), torch.Size([1, 2, 8]))
    >>> h1, c1 = model.zero_state(2)
    >>> for t in range(5):
    ...     mu_t, ls_t, h1, c1 = model.step(x[:, t], h1, c1)
    >>> bool(torch.allclose(mu_t, mu[:, -1], atol=1e-6))
    True
    """

    def __init__(
        self,
        n_features: int,
        hidden_size: int,
        num_layers: int,
        horizon: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.horizon = horizon
        self.lstm = nn.LSTM(
            input_size=n_features,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, 2 * horizon)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> SimpleLSTM:
        return cls(spec.n_features, spec.hidden_size, spec.num_layers, spec.horizon, spec.dropout)

    def set_dropout(self, p: float) -> None:
        """Dropout ``p`` before the head and between stacked layers (a retrain sets it on a copy
        of the served model, whose own spec may say another).

        >>> m = SimpleLSTM(1, 4, 2, 3); m.set_dropout(0.3); m.dropout.p, m.lstm.dropout
        (0.3, 0.3)
        """
        self.dropout.p = p
        self.lstm.dropout = p if self.num_layers > 1 else 0.0

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Run whole sequences.

        ``x`` is ``[batch, time, n_features]`` (normalized). Returns ``mu`` and ``log_b``,
        each ``[batch, time, horizon]``, and the final ``(h, c)``, each
        ``[num_layers, batch, hidden]``.
        """
        out, (h, c) = self.lstm(x, state)
        mu, log_b = self._head(out)
        return mu, log_b, (h, c)

    def step(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Advance a batch of devices by one reading each.

        ``x`` is ``[batch, n_features]``; ``h`` and ``c`` are ``[num_layers, batch, hidden]``
        and are returned updated, not modified in place. Returns ``(mu, log_b, h, c)``
        with ``mu`` and ``log_b`` of shape ``[batch, horizon]``.
        """
        out, (h, c) = self.lstm(x.unsqueeze(1), (h, c))
        mu, log_b = self._head(out[:, 0])
        return mu, log_b, h, c

    def forward_packed(
        self, x: PackedSequence, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Run sequences of different lengths in one call (one cuDNN call on the GPU).

        ``x`` packs ``S`` sequences (``torch.nn.utils.rnn.pack_sequence`` or built directly:
        ``x.data`` is ``[N, n_features]``, time-major); ``state`` is each sequence's starting
        ``(h, c)``, ``[num_layers, S, hidden]``, in the order the sequences were given. Returns ``mu`` and
        ``log_b``, each ``[N, horizon]`` in the rows of ``x.data``, and each sequence's
        ``(h, c)`` after its last reading.

        >>> from torch.nn.utils.rnn import pack_sequence
        >>> model = SimpleLSTM(n_features=1, hidden_size=4, num_layers=1, horizon=2).eval()
        >>> x = pack_sequence([torch.randn(3, 1), torch.randn(1, 1)])  # 3 readings, then 1
        >>> mu, log_b, (h, c) = model.forward_packed(x, model.zero_state(2))
        >>> mu.shape, h.shape
        (torch.Size([4, 2]), torch.Size([1, 2, 4]))
        """
        out, (h, c) = self.lstm(x, state)
        mu, log_b = self._head(out.data)
        return mu, log_b, (h, c)

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """All-zero (h, c) for ``batch`` devices: the state of a device never seen."""
        shape = (self.num_layers, batch, self.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def _head(self, out: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_b = self.head(self.dropout(out)).chunk(2, dim=-1)
        return mu, log_b.clamp(LOG_B_MIN, LOG_B_MAX)


def largest_weight(model: SimpleLSTM) -> float:
    """The largest ``|w|`` of ``model`` (NaN if any is): what a load bounds (registry.MAX_WEIGHT).

    >>> largest_weight(SimpleLSTM(n_features=1, hidden_size=2, num_layers=1, horizon=1)) < 1
    True
    """
    return max(float(w.detach().abs().max()) for w in model.parameters())


class LoadedModel(NamedTuple):
    """A loaded model, its spec and its metadata (``models/registry.py`` reads and writes
    them); unpacks as ``model, spec, meta``.

    >>> spec = ModelSpec(hidden_size=2, horizon=1)
    >>> model, spec2, meta = LoadedModel(SimpleLSTM.from_spec(spec), spec, {"version": "v0007"})
    >>> spec2 == spec, meta["version"]
    (True, 'v0007')
    """

    model: SimpleLSTM
    spec: ModelSpec
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.meta.get("version") or "unknown")

    @property
    def created_ts(self) -> float | None:
        """When it was made (its metadata's ``created_at``), in epoch seconds; None if unsaid.

        >>> LoadedModel(None, ModelSpec(), {"created_at": "2026-12-06T03:00:00Z"}).created_ts
        1796526000.0
        """
        try:
            return float(calendar.timegm(time.strptime(str(self.meta["created_at"]), "%Y-%m-%dT%H:%M:%SZ")))
        except (KeyError, ValueError):
            return None

    @classmethod
    def of(cls, model: SimpleLSTM, spec: ModelSpec, version: str) -> LoadedModel:
        """A model as served: its weights, its spec and its version.

        >>> LoadedModel.of(SimpleLSTM.from_spec(ModelSpec()), ModelSpec(), "v0001").version
        'v0001'
        """
        return cls(model, spec, {"version": version})
