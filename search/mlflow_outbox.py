"""MLflow writes of the search driver, kept in order and retried while the tracking store is down.

Every write the Tune callback makes is an operation (a name and plain arguments, so that the
queue can be saved as JSON) put into this outbox, which hands them in order to the callback's
``apply``. When the store is unavailable (server restarting, network gone, SQLite busy) the
failed operation and all later ones stay queued, the queue is saved to a file, and the next
callback event tries again, so trials go on training and nothing is lost. A deterministic
refusal (a 4xx answer) is logged and that one operation dropped, so one bad value cannot hold
back the record of the whole search. A restored driver reloads the file.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellseg.atomic_file import write_atomic
from cellseg.tracking import is_unavailable

log = logging.getLogger(__name__)

Operation = tuple[str, dict[str, Any]]  # (operation name, keyword arguments)


class Outbox:
    """An ordered queue of operations ``apply(name, **kwargs)``, saved as JSON at ``path``."""

    def __init__(
        self, apply: Callable[..., None], path: Path | None = None, retry_after_s: float = 10.0
    ) -> None:
        self._apply = apply
        self.path = path
        self.retry_after_s = retry_after_s
        self.pending: deque[Operation] = deque()
        self._down_since: float | None = None
        self._next_try = 0.0
        if path is not None and path.is_file():
            self.pending.extend((op, kwargs) for op, kwargs in json.loads(path.read_text()))
            log.warning("replaying %d MLflow writes left over in %s", len(self.pending), path)

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
                self._apply(op, **kwargs)
            except Exception as exc:
                if not is_unavailable(exc):
                    log.error("MLflow refused %s for %s, dropped: %s", op, kwargs.get("trial_id"), exc)
                    self.pending.popleft()
                    continue
                if self._down_since is None:
                    self._down_since = time.time()
                    log.warning("MLflow unavailable (%s); keeping writes queued and retrying", exc)
                self._next_try = time.time() + self.retry_after_s
                self._save()
                return False
            self.pending.popleft()
        if self._down_since is not None:
            log.warning(
                "MLflow reachable again after %.0f s; queued writes applied", time.time() - self._down_since
            )
            self._down_since = None
            self._next_try = 0.0  # reachable: the next writes go at once
        self._save()
        return True

    def drain(self, timeout_s: float, interval_s: float = 5.0) -> bool:
        """Retry until every operation is applied or ``timeout_s`` passes; True when empty."""
        deadline = time.time() + timeout_s
        while not self.flush(force=True):
            if time.time() >= deadline:
                return False
            time.sleep(interval_s)
        return True

    def _save(self) -> None:
        if self.path is None:
            return
        if not self.pending:
            self.path.unlink(missing_ok=True)
            return
        payload = json.dumps(list(self.pending)).encode("utf-8")
        write_atomic(self.path, lambda file: file.write(payload))
