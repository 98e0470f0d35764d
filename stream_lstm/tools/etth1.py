"""The standard ETTh1 protocol, run the way the service runs its model (``evaluate --etth1``).

Train on rows 0-8639 (months 1-12), validate on 8640-11519, test on 11520-14399; univariate
OT; MSE and MAE on values scaled by a standard scaler fitted on the training rows, over every
sliding window whose targets are test rows. Published figures to compare with are in
``../shared/data/README.md`` (Informer, AAAI 2021: LSTMa 0.114, Informer 0.098 MSE at h=24).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def etth1_protocol(path: Path, horizons: list[int], settings: Any, epochs: int | None) -> dict[str, Any]:
    """Train rows 0-8639, validate 8640-11519, test 11520-14399; univariate OT; a standard
    scaler fitted on the training rows; MSE/MAE on scaled values over every test window.

    The model runs as the service runs it: its inputs are the readings normalized online
    (the serving normalizer, causal), it predicts the change from the last reading, and its
    forecasts are turned back into OT units; only the score uses the protocol's scaler.
    Streaming also differs from the offline protocol in its look-back: instead of a fixed
    window, the LSTM state is carried over the whole history (train, validation, test) one
    hour at a time, and a forecast is made at every test hour from that state.
    """
    import torch

    from stream_lstm.models.lstm import SimpleLSTM
    from stream_lstm.recordings import load_csv
    from stream_lstm.state.normalizer import normalize_sequence
    from stream_lstm.tools.recipe import recipe
    from stream_lstm.training.data import series_windows
    from stream_lstm.training.tbptt import train_tbptt

    _, x = load_csv(path, "date", ["OT"])
    x = x[:14400, 0]
    mean, std = x[:8640].mean(), x[:8640].std()
    xs = (x - mean) / std  # the protocol's scaled values: what is scored
    z, _, scale = normalize_sequence(x[:, None], settings.normalizer, settings.normalizer_alpha,
                                     settings.std_floor)
    r = recipe(settings, epochs)  # (its TBPTT window 64 too, but for STREAM_LSTM_TBPTT_K2 given)
    out: dict[str, Any] = {"protocol": "ETTh1 univariate OT, train 0-8639 / val 8640-11519 / test 11520-14399"}
    for h in horizons:
        torch.manual_seed(0)
        model = SimpleLSTM(1, settings.hidden_size, settings.num_layers, h, settings.dropout)
        train_tbptt(model, series_windows(z[:8640], 1024, 128), series_windows(z[8640:11520], 512, 512),
                    k1=settings.tbptt_k1, k2=settings.tbptt_k2 if "tbptt_k2" in settings.model_fields_set else 64,
                    lr=r["learning_rate"], weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
                    max_epochs=r["max_epochs"], patience=r["early_stopping_patience"],
                    batch_size=r["train_batch_size"])
        with torch.no_grad():
            mu, _, _ = model(torch.from_numpy(z)[None])
        forecast = x[:, None] + scale * mu[0].double().numpy()  # OT units, [T, h]
        starts = range(11520 - 1, 14400 - h)  # forecast made at t for t+1..t+h, all in test rows
        e = np.array([(forecast[t] - mean) / std - xs[t + 1 : t + 1 + h] for t in starts])
        persist = np.array([xs[t] - xs[t + 1 : t + 1 + h] for t in starts])
        out[f"h{h}"] = {"mse": float((e**2).mean()), "mae": float(np.abs(e).mean()),
                        "persistence_mse": float((persist**2).mean()),
                        "persistence_mae": float(np.abs(persist).mean()), "windows": len(e)}
        print(f"ETTh1 h={h}: MSE {out[f'h{h}']['mse']:.3f} MAE {out[f'h{h}']['mae']:.3f} "
              f"(persistence MSE {out[f'h{h}']['persistence_mse']:.3f}; published LSTMa "
              f"{ {24: 0.114, 48: 0.193}.get(h, '-') }, Informer { {24: 0.098, 48: 0.158}.get(h, '-') })")
    return out
