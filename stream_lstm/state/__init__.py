"""Per-device state: plain data (arrays and tensors indexed by slot) that checkpointing moves."""
