"""Telemetry off: the environment that keeps MLflow and Ray from calling home.

cellseg puts these variables into every process it starts: ``cellseg.tracking`` sets them before
MLflow is imported (the CLI and the search driver), the search driver before Ray starts and in
the Ray runtime environment (trial workers, also on an existing cluster), and ``cluster.yaml``
on the cluster's nodes. A value the user has set wins (``RAY_USAGE_STATS_ENABLED=1`` turns Ray's
statistics back on); ``CELLSEG_TELEMETRY=on`` leaves every library at its own default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

OPT_IN = "CELLSEG_TELEMETRY"
OFF: dict[str, str] = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3: usage events to config.mlflow-telemetry.io
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray: usage statistics to usage-stats.ray.io
}


def telemetry_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables of ``OFF`` at the user's value where set, else off; none after opting in."""
    if environ.get(OPT_IN, "").lower() in ("1", "on", "true", "yes"):
        return {}
    return {key: environ.get(key, value) for key, value in OFF.items()}


def switch_off_telemetry() -> dict[str, str]:
    """Put ``telemetry_env()`` into this process's environment (inherited by its children)."""
    env = telemetry_env()
    os.environ.update(env)
    return env
