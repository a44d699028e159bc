"""What a trial reports to Tune each epoch: the few values Tune acts on, the rest as one text.

Tune keeps running statistics of every number a result carries (for every trial, in its saved
experiment state, which it rewrites whole at every save). With the ~40 numbers of a cellseg epoch
that was ~37 kB a trial, so the state file and the time spent writing it grew with every finished
trial (39 MB at 1000 trials). Tune and the search's readers of Tune's results need only the metric, the epoch,
the epoch's training and validation seconds (the efficiency figure) and the node; every other
number travels as one JSON text under :data:`METRICS_KEY`, which only the MLflow callback reads.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from cellseg.training import TRAIN_SECONDS, VAL_SECONDS

NODE_KEY = "node_id"
METRICS_KEY = "epoch_metrics"  # the epoch's other numbers, as a JSON object
# besides the metric, what the search's readers of Tune's results use
TUNE_KEYS = ("epoch", TRAIN_SECONDS, VAL_SECONDS)


def tune_result(metrics: Mapping[str, float], *, metric: str, node_id: str) -> dict[str, Any]:
    """The result that reports ``metrics`` (an epoch's numbers, ``metric`` among them when the
    epoch was validated) from the node ``node_id``."""
    kept = {k: v for k, v in metrics.items() if k == metric or k in TUNE_KEYS}
    rest = {k: float(v) for k, v in metrics.items() if k not in kept}
    return {**kept, NODE_KEY: node_id, METRICS_KEY: json.dumps(rest)}


def reported_metrics(result: Mapping[str, Any], skip: Collection[str]) -> dict[str, float]:
    """Every number a trial reported in Tune's ``result``: its numbers but those in ``skip``
    (Tune's own), and those in :data:`METRICS_KEY`."""
    numbers = {k: float(v) for k, v in result.items() if k not in skip and isinstance(v, (int, float))}
    numbers.update(json.loads(result.get(METRICS_KEY) or "{}"))
    return numbers
