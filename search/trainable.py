"""The Tune trainable: a sampled flat dict applied to the base config, then the library's fit.

Importable by module path so that workers on other nodes can load it; it takes only plain data.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ray import tune

from cellseg.config import apply_overrides, config_from_dict
from cellseg.training import fit

RUN_SUBDIR = "run"


def train_trial(config: dict[str, Any], *, base: dict[str, Any]) -> None:
    """Train one trial; every epoch reports the metrics with the run directory as checkpoint.

    A retried or restored trial continues from its last reported checkpoint.
    """
    cfg = apply_overrides(config_from_dict(base), config)
    run_dir = Path(tune.get_context().get_trial_dir()) / RUN_SUBDIR
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if Path(directory).resolve() != run_dir.resolve():
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(directory, run_dir)
        resume_from = run_dir

    def report(metrics: dict[str, float], directory: Path) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(directory)))

    fit(cfg, run_dir=run_dir, report=report, resume_from=resume_from, progress=False)


def trial_dirname(trial: tune.experiment.Trial) -> str:
    """Short trial folder names (Tune's default embeds every sampled value)."""
    return f"trial_{trial.trial_id}"
