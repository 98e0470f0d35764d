"""The process environment against the settings: ``STREAM_LSTM_*`` variables that name none.

pydantic-settings ignores a variable that names no field, so a misspelt one (``WINDOWS`` for
``WINDOW``) would change nothing, silently. Each service says so at start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

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
