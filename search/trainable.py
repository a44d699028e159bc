"""The Tune trainable: a sampled flat dict applied to the base config, then the library's fit.

Importable by module path so that workers on other nodes can load it; it takes only plain data.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.result import TRAINING_ITERATION

from cellseg.config import Config, apply_overrides, config_from_dict
from cellseg.training import fit, resolve_device
from search.faults import fault_from_env, no_fault
from search.linked_storage import is_local, linking_filesystem
from search.tune_report import tune_result
from search.worker_memory import release_freed_memory

# search/ is not installed: the driver ships this copy with the job (ray.init(runtime_env=...)),
# and Ray workers on every node import the trainable from it.
WORKER_RUNTIME_ENV = {"py_modules": [str(Path(__file__).resolve().parent)]}


SCRATCH_PREFIX = "cellseg-trial-"
# The search's tuners reuse trial workers (a new one costs some 9 s of imports on a CPU: torch,
# torchvision, Ray Tune); train_trial hands back what the worker's previous trial freed.
REUSE_WORKERS = True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_scratch(folder: Path) -> None:
    """Remove the scratch folders in ``folder`` of workers that died without running their exit
    handlers (killed trials, a lost driver's workers): their names carry the worker's pid."""
    for scratch in folder.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = scratch.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


@functools.cache
def _worker_scratch() -> Path:
    """This worker's scratch folder, removed when the worker exits. Each trial works in a
    folder of its own inside it and removes it when it ends, also when the scheduler stops it
    (the trial's thread then unwinds from tune.report). A worker killed outright leaves its folder
    behind: the next worker that starts on the node removes it."""
    remove_dead_scratch(Path(tempfile.gettempdir()))
    folder = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, True)
    return Path(folder)


def train_trial(
    config: dict[str, Any], *, base: dict[str, Any], fault_drill: bool = False, link_checkpoints: bool = False
) -> None:
    """Train one trial; every epoch reports the metrics with the run directory as checkpoint.

    The run directory is scratch space on the worker: Tune copies each reported checkpoint to
    the search's storage, or hard-links it with ``link_checkpoints`` (storage on a local path,
    search/linked_storage.py). A retried or restored trial continues from its last checkpoint.
    Only with ``fault_drill`` does the trial read the drill's variables (``search/faults.py``).
    """
    release_freed_memory()  # what the worker's previous trial freed (workers are reused)
    cfg = apply_overrides(config_from_dict(base), config)
    scratch = Path(tempfile.mkdtemp(dir=_worker_scratch()))
    try:
        _train(cfg, scratch / "run", fault_drill=fault_drill, link_checkpoints=link_checkpoints)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(cfg: Config, run_dir: Path, *, fault_drill: bool, link_checkpoints: bool) -> None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None and is_local(checkpoint.filesystem):
        shutil.copytree(checkpoint.path, run_dir)  # as_directory would download a linked one first
    elif checkpoint is not None:
        with checkpoint.as_directory() as directory:
            shutil.copytree(directory, run_dir)

    node_id = ray.get_runtime_context().get_node_id()
    inject = fault_from_env() if fault_drill else no_fault
    filesystem = linking_filesystem() if link_checkpoints else None

    def report(metrics: dict[str, float], directory: Path) -> None:
        if int(metrics["epoch"]) == cfg.train.epochs:  # pictures go into the last checkpoint
            # imported here: matplotlib costs every worker a fraction of a second at start, and
            # most trials never reach their last epoch (ASHA stops them)
            from cellseg.run_pictures import write_run_pictures

            write_run_pictures(directory, resolve_device(cfg.train.device))
        inject(int(metrics["epoch"]))
        tune.report(
            tune_result(metrics, metric=cfg.train.metric, node_id=node_id),
            checkpoint=tune.Checkpoint(str(directory), filesystem=filesystem),
        )

    fit(
        cfg,
        run_dir=run_dir,
        report=report,
        progress=False,
        resume_from=run_dir if checkpoint is not None else None,
    )


def trial_dirname(trial: tune.experiment.Trial) -> str:
    """Short trial folder names (Tune's default embeds every sampled value)."""
    return f"trial_{trial.trial_id}"


def reached_max_epochs(result: Mapping[str, Any], max_epochs: int) -> bool:
    """Whether the trial whose latest result is ``result`` has trained every epoch (so it ended
    as planned, not stopped early by ASHA or the time budget)."""
    return result.get(TRAINING_ITERATION, 0) >= max_epochs
