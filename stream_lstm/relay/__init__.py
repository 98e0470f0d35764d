"""Alert events out of Kafka, into the tools on-call teams read (Prometheus' Alertmanager)."""
