"""The forecasting model and its on-disk registry. Knows nothing of Kafka."""

from stream_lstm.models.lstm import ModelSpec, SimpleLSTM

__all__ = ["ModelSpec", "SimpleLSTM"]
