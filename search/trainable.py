"""The Tune trainable: a sampled flat dict applied to the base config, then the library's fit.

Importable by module path so that workers on other nodes can load it; it takes only plain data.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.result import TRAINING_ITERATION

from cellseg.config import apply_overrides, config_from_dict
from cellseg.training import fit, resolve_device
from search.faults import fault_from_env, no_fault

NODE_KEY = "node_id"
# search/ is not installed: the driver ships this copy with the job (ray.init(runtime_env=...)),
# and Ray workers on every node import the trainable from it.
WORKER_RUNTIME_ENV = {"py_modules": [str(Path(__file__).resolve().parent)]}


SCRATCH_PREFIX = "cellseg-trial-"


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


def _fresh_scratch() -> Path:
    """A new scratch folder, removed when the worker exits (each trial has its own worker:
    the tuner sets reuse_actors=False); a trial the scheduler stops never returns from
    tune.report, so the folder cannot be removed when the trial ends. A worker killed outright
    leaves its folder behind: the next trial on the node removes it."""
    remove_dead_scratch(Path(tempfile.gettempdir()))
    folder = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, True)
    return Path(folder)


def train_trial(config: dict[str, Any], *, base: dict[str, Any], fault_drill: bool = False) -> None:
    """Train one trial; every epoch reports the metrics with the run directory as checkpoint.

    The run directory is scratch space on the worker: Tune copies each reported checkpoint to
    the search's storage. A retried or restored trial continues from its last checkpoint. Only
    with ``fault_drill`` does the trial read the drill's variables (``search/faults.py``).
    """
    cfg = apply_overrides(config_from_dict(base), config)
    run_dir = _fresh_scratch() / "run"
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            shutil.copytree(directory, run_dir)

    node_id = ray.get_runtime_context().get_node_id()
    inject = fault_from_env() if fault_drill else no_fault

    def report(metrics: dict[str, float], directory: Path) -> None:
        if int(metrics["epoch"]) == cfg.train.epochs:  # pictures go into the last checkpoint
            # imported here: matplotlib costs every worker a fraction of a second at start, and
            # most trials never reach their last epoch (ASHA stops them)
            from cellseg.run_pictures import write_run_pictures

            write_run_pictures(directory, resolve_device(cfg.train.device))
        inject(int(metrics["epoch"]))
        tune.report({**metrics, NODE_KEY: node_id}, checkpoint=tune.Checkpoint.from_directory(str(directory)))

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
