"""Offline tools around the worker.

``fleet`` (synthetic sensor fleet with ground-truth anomalies), ``simulate`` and ``replay``
(produce a fleet or CSV recordings into the input topic), ``scoring`` (metrics and baselines
for evaluation), plus ``bench``, ``evaluate`` and ``demo`` (``stream-lstm up``).
"""

import argparse
import math


def finite_float(text: str) -> float:
    """An ``argparse`` type: a number, but not nan or inf (``--duration nan`` was a traceback,
    ``--step-s nan`` sent readings timed NaN; a review).

    >>> finite_float("2.5")
    2.5
    >>> finite_float("nan")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: 'nan' is not a finite number
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An ``argparse`` type: a whole number of 1 or more (``gpu-check --devices 0`` measured
    nothing and reported 0 steps/s; a review).

    >>> positive_int("3")
    3
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: '0' is not a whole number of 1 or more
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value
