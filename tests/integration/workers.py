"""Worker processes for crash and rebalance tests: real `stream-lstm run` subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stream_lstm.config import Settings

REPO = Path(__file__).resolve().parents[2]


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ) | settings.environment()
    env.update(extra)
    env["PYTHONPATH"] = str(REPO)
    return env


def start_worker(settings: Settings, instance: str, log_path: Path) -> subprocess.Popen:
    env = settings_env(settings, STREAM_LSTM_INSTANCE_ID=instance, STREAM_LSTM_METRICS_PORT="0")
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes it
    return subprocess.Popen([sys.executable, "-m", "stream_lstm.cli", "run"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
