"""Everything that talks to Kafka. Knows nothing of the model."""
