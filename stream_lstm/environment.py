"""The process environment: ``STREAM_LSTM_*`` variables that name no setting, and the CPU cores
the process may use.

pydantic-settings ignores a variable that names no field, so a misspelt one (``WINDOWS`` for
``WINDOW``) would change nothing, silently. Each service says so at start.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

from stream_lstm.config import ENV_PREFIX, Settings

# Read by the tools, not settings of the service (kafka/jars.py, the CI script, bench).
OTHER_VARIABLES = frozenset({"CACHE_DIR", "KAFKA_POM", "CI_VENV", "BENCH"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``STREAM_LSTM_*`` variables that name no setting: most likely misspelt, and ignored.

    >>> unknown_variables({"STREAM_LSTM_WINDOWS": "32", "STREAM_LSTM_WINDOW": "32", "HOME": "/"})
    ['STREAM_LSTM_WINDOWS']
    """
    known = {name.upper() for name in Settings.model_fields} | OTHER_VARIABLES
    return sorted(var for var in environ
                  if var.upper().startswith(ENV_PREFIX)
                  and var.upper()[len(ENV_PREFIX):] not in known)


def warn_unknown_variables(logger: logging.Logger) -> None:
    """Log each misspelt ``STREAM_LSTM_*`` variable of this process (start-up of a service)."""
    for var in unknown_variables(os.environ):
        logger.warning(f"{var} names no setting and is ignored: misspelt? "
                       "(`python -m stream_lstm.config` lists the settings)")


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPU cores this process may use: its affinity mask (which a container's cpuset
    narrows), and no more than its CPU quota, rounded up. The quota is what Kubernetes'
    ``resources.limits.cpu`` sets: a pod limited to 2 CPUs on a 64-core node sees 64 in its
    mask, and ``PROCESSES=auto`` started 64 workers that the kernel then throttled.

    >>> usable_cpus() >= 1
    True
    """
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota(cgroup_root, own_cgroup)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cpu_quota(cgroup_root: Path, own_cgroup: Path) -> float | None:
    """CPUs' worth of time a period that this process's cgroup and its ancestors allow (the
    least of them), or None for no limit. cgroup v2: ``cpu.max`` (``"150000 100000"`` is 1.5
    CPUs, ``"max 100000"`` none); v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of
    -1: none). A container usually sees its own cgroup at the root of the mount, a host the
    full path: both are read."""
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return None
    places: list[Path] = []
    for line in lines:
        if line.count(":") < 2:
            continue  # (not a cgroup line: nothing to read from it)
        _, controllers, path = line.split(":", 2)
        mounts = [cgroup_root] if controllers == "" else \
            [cgroup_root / m for m in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if "cpu" in controllers.split(",")]
        for mount in mounts:
            here = mount / path.lstrip("/")
            places += [here, *[p for p in here.parents if mount in p.parents or p == mount]]
    quotas = [q for place in dict.fromkeys(places) if (q := _quota_at(place)) is not None]
    return min(quotas, default=None)


def _quota_at(place: Path) -> float | None:
    try:
        if (v2 := place / "cpu.max").exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)
        quota_us = int((place / "cpu.cfs_quota_us").read_text())
        period_us = int((place / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
