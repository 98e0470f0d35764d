"""Offline tools around the worker.

``fleet`` (synthetic sensor fleet with ground-truth anomalies), ``simulate`` and ``replay``
(produce a fleet or CSV recordings into the input topic), ``scoring`` (metrics and baselines
for evaluation), plus ``bench``, ``evaluate`` and ``demo`` (``stream-lstm up``).
"""
