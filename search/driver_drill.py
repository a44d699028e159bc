"""A drill for ``--resume``: the search driver kills or interrupts itself at a chosen point.

``CELLSEG_DRIVER_DRILL=<search name>:<signal>@<point>[#<n>]`` in the driver's environment makes
the driver of the search named ``<search name>`` (and no other) send itself ``<signal>`` the
``<n>``-th time (default 1) it reaches ``<point>``:

- signals: ``kill`` (SIGKILL to the driver's process group: the driver and the local Ray it
  started, as a lost machine or the OOM killer would) and ``int`` (SIGINT to the driver: Ctrl-C);
- points: ``result`` (the driver has just queued a trial's result for MLflow; the other trials
  are mid-epoch), ``trial-end`` (Tune has ended a trial; its MLflow run is not closed yet),
  ``upload`` (the MLflow writer process has uploaded the trial's checkpoint; its run is not closed
  yet), ``closed`` (the writer has just closed the trial's MLflow run; Tune's saved state may not
  know yet). The writer's points stop the driver's process group (``kill``) or the driver
  (``int``) from the writer.

Unset, it costs one environment lookup per search.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field

DRILL_ENV = "CELLSEG_DRIVER_DRILL"
SIGNALS = {"kill": signal.SIGKILL, "int": signal.SIGINT}
POINTS = ("result", "trial-end", "upload", "closed")

log = logging.getLogger(__name__)


@dataclass
class DriverDrill:
    """Where and how the driver of ``search`` stops itself; :meth:`reached` fires it."""

    search: str
    signal: str
    point: str
    count: int = 1
    pid: int = 0  # the driver's process (0: this one; the MLflow writer process names its driver)
    _seen: int = field(default=0, init=False)

    def reached(self, point: str) -> None:
        """Count ``point``; send the signal when it is this drill's point for the n-th time."""
        if point != self.point:
            return
        self._seen += 1
        if self._seen != self.count:
            return
        log.warning("%s: %s at %s #%d", DRILL_ENV, self.signal, point, self.count)
        if self.signal == "kill":
            os.killpg(os.getpgrp(), SIGNALS["kill"])
        os.kill(self.pid or os.getpid(), SIGNALS[self.signal])


def parse_drill(spec: str) -> DriverDrill:
    """``"s1:kill@upload#2"`` -> DriverDrill; ValueError naming the variable for anything else."""
    search, _, rest = spec.rpartition(":")
    sig, _, point = rest.partition("@")
    point, _, count = point.partition("#")
    if (
        not search
        or sig not in SIGNALS
        or point not in POINTS
        or not (count or "1").isdigit()
        or int(count or "1") < 1
    ):
        raise ValueError(
            f"{DRILL_ENV}={spec!r}: expected <search name>:<signal>@<point>[#<n>] "
            f"with signal one of {', '.join(SIGNALS)} and point one of "
            f"{', '.join(POINTS)}, e.g. search-1:kill@upload"
        )
    return DriverDrill(search, sig, point, int(count or "1"))


def drill_for(search: str) -> DriverDrill | None:
    """The drill of the environment when it names ``search``, else None."""
    spec = os.environ.get(DRILL_ENV)
    if not spec:
        return None
    drill = parse_drill(spec)
    return drill if drill.search == search else None
