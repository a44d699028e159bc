"""The errors a user can fix, one type per kind of problem; each message names what to fix.

``cellseg`` prints these as one line (exit code 2). Any other exception is a bug and keeps its
traceback. A leaf module: every layer may raise these.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type or impossible value."""


class DataError(ValueError):
    """A dataset, checkpoint or results file or folder that cannot be used."""


class TrackingError(RuntimeError):
    """MLflow cannot be used: unreachable server, unwritable store, no matching run."""


USER_ERRORS = (ConfigError, DataError, TrackingError)  # what the CLI reports without a traceback
