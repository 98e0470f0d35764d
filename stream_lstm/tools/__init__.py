"""Offline tools: the simulated fleet, CSV replay, benchmark, evaluation and the local demo."""
