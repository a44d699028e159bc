"""MLflow writes kept in order and retried while the tracking store is down.

The MLflow writer process (search/mlflow_writer.py) puts every operation of the search's trials
(a name and plain arguments) into this outbox, which hands them in order to ``apply``. When the
store is unavailable (server restarting, network gone, SQLite busy) the failed operation and all
later ones stay queued and are tried again after ``retry_after_s``, so trials go on training and
nothing is lost. A deterministic refusal (a 4xx answer) is logged and that one operation
dropped, so one bad value cannot hold back the record of the whole search; a refusal of the
outbox's ``prepare`` (what every operation needs first) is raised instead. The queue lives in
memory; the writer's journal keeps it across a crash.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from cellseg.tracking import is_unavailable

log = logging.getLogger(__name__)

Operation = tuple[str, dict[str, Any]]  # (operation name, keyword arguments)
RETRY_AFTER_S = 10.0  # how long writes wait after the store was found unavailable


class Outbox:
    """An ordered queue of operations ``apply(name, **kwargs)``; ``prepare()``, when given, runs
    once before the first of them, retried like them while the store is unavailable (any other
    error of it propagates: no operation can go without it)."""

    def __init__(
        self,
        apply: Callable[..., object],
        retry_after_s: float = RETRY_AFTER_S,
        *,
        prepare: Callable[[], object] | None = None,
    ) -> None:
        self._apply = apply
        self._prepare = prepare
        self.retry_after_s = retry_after_s
        self.pending: deque[Operation] = deque()
        self._down_since: float | None = None
        self._next_try = 0.0

    def retry_in(self) -> float:
        """Seconds until queued operations are tried again (0: now)."""
        return max(0.0, self._next_try - time.time())

    def put(self, op: str, /, **kwargs: Any) -> bool:
        """Queue one operation, then flush; False while the store is unavailable."""
        self.pending.append((op, kwargs))
        return self.flush()

    def flush(self, force: bool = False) -> bool:
        """Apply queued operations in order; stop at the first that finds the store unavailable.

        After a failure, calls within ``retry_after_s`` return False at once unless ``force``.
        """
        if self.pending and not force and time.time() < self._next_try:
            return False
        while self.pending:
            op, kwargs = self.pending[0]
            try:
                if self._prepare is not None:
                    self._prepare()
                    self._prepare = None
                self._apply(op, **kwargs)
            except Exception as exc:
                if not is_unavailable(exc):
                    if self._prepare is not None:
                        raise
                    log.error("MLflow refused %s for %s, dropped: %s", op, kwargs.get("trial_id"), exc)
                    self.pending.popleft()
                    continue
                if self._down_since is None:
                    self._down_since = time.time()
                    log.warning("MLflow unavailable (%s); keeping writes queued and retrying", exc)
                self._next_try = time.time() + self.retry_after_s
                return False
            self.pending.popleft()
        if self._down_since is not None:
            log.warning(
                "MLflow reachable again after %.0f s; queued writes applied", time.time() - self._down_since
            )
            self._down_since = None
            self._next_try = 0.0  # reachable: the next writes go at once
        return True

    def drain(self, timeout_s: float, interval_s: float = 5.0) -> bool:
        """Retry until every operation is applied or ``timeout_s`` passes; True when empty."""
        deadline = time.time() + timeout_s
        while not self.flush(force=True):
            if time.time() >= deadline:
                return False
            time.sleep(interval_s)
        return True
