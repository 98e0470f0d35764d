"""The alert relay's series (stream_lstm/relay/metrics.py)."""

from stream_lstm.relay.metrics import RelayMetrics


def test_each_relay_has_its_own_registry_and_every_series_is_exported():
    a, b = RelayMetrics(), RelayMetrics()
    a.relayed.inc(2)
    text = a.exposition().decode()
    for name in ("stream_lstm_alerts_relayed_total 2.0", "stream_lstm_alerts_refused_total 0.0",
                 "stream_lstm_alertmanager_failures_total 0.0", "stream_lstm_relay_open_alerts 0.0",
                 "stream_lstm_relay_ready 0.0"):
        assert name in text, name
    assert "stream_lstm_alerts_relayed_total 0.0" in b.exposition().decode()
