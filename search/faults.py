"""Fault injection for reliability drills: make trials fail on purpose, the way real ones do.

Off unless the driver runs with ``--fault-drill``: only then does a trial read the variables below,
once when it starts. Set them in the environment of the Ray workers
(``ray.init(runtime_env={"env_vars": ...})`` or the shell that starts Ray):

- ``CELLSEG_FAULT=<kind>@<epoch>``: a trial fails after training epoch ``<epoch>``, before that
  epoch is reported. Kinds: ``error`` (a RuntimeError), ``oom`` (torch's CUDA out-of-memory
  error, also on a CPU machine), ``exit`` (the worker process dies, as on a segfault or a lost
  machine).
- ``CELLSEG_FAULT_DIR`` (default: the worker's working directory): a folder every worker can
  write (shared storage on a cluster); each
  injected fault claims one token file there, so the faults fire ``CELLSEG_FAULT_COUNT`` times
  (default 1) in the whole search, whatever the number of trials and retries.

Nothing happens when ``CELLSEG_FAULT`` is unset.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

FAULT_ENV, DIR_ENV, COUNT_ENV = "CELLSEG_FAULT", "CELLSEG_FAULT_DIR", "CELLSEG_FAULT_COUNT"
KINDS = ("error", "oom", "exit")


class InjectedFault(RuntimeError):
    """The ``error`` kind of injected fault."""


def parse_fault(spec: str) -> tuple[str, int]:
    """``"oom@2"`` -> ``("oom", 2)``; ValueError naming the variable for anything else."""
    kind, _, epoch = spec.partition("@")
    if kind not in KINDS or not epoch.isdigit() or int(epoch) < 1:
        raise ValueError(
            f"{FAULT_ENV}={spec!r}: expected <kind>@<epoch> with kind one of "
            f"{', '.join(KINDS)} and epoch >= 1, e.g. oom@2"
        )
    return kind, int(epoch)


def _claim_token() -> bool:
    """Take one of the COUNT tokens in DIR (atomic create), False when all are taken."""
    folder = Path(os.environ.get(DIR_ENV) or ".")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(int(os.environ.get(COUNT_ENV, "1"))):
        try:
            os.close(os.open(folder / f"fault-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def no_fault(epoch: int) -> None:
    """The injector of every trial that is not part of a drill."""


def fault_from_env() -> Callable[[int], None]:
    """This trial's injector, from ``CELLSEG_FAULT`` read now: ``no_fault`` when it is unset.

    The injector raises (or exits) after the epoch the drill names, when a token is left.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return no_fault
    kind, at = parse_fault(spec)

    def inject(epoch: int) -> None:
        if epoch != at or not _claim_token():
            return
        message = f"injected {kind} fault after epoch {epoch} ({FAULT_ENV}={spec})"
        if kind == "exit":
            os._exit(17)
        if kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory. {message}")
        raise InjectedFault(message)

    return inject
