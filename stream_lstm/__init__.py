"""stream-lstm: stateful LSTM forecasting for sensor streams on Kafka."""

__version__ = "0.1.0"
