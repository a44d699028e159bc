"""The search driver's store writes per result and per trial: SQLite's defaults, WAL, a journal study.

What the driver writes to its stores for one reported result (one MLflow batch of a trial's
epoch metrics through ``Tracker.log_metrics``, one Optuna intermediate value) and for one trial
(its MLflow run started with the demo config's parameters and ended; an Optuna trial asked, the
demo space sampled define-by-run, told PRUNED), in rounds (after one not counted) over three
variants, their order reversed every other round: SQLite's defaults (``CELLSEG_SQLITE_WAL=0``:
rollback journal, a sync per commit; the baseline), ``cellseg.sqlite_commits`` (WAL,
``synchronous=NORMAL``; what the search uses for MLflow, and used for its study until 2026-12-05),
and WAL for MLflow with the Optuna study in Optuna's journal file (``JournalFileBackend``: a line
appended and synced per write; what the search uses since, search/study_file.py) instead of SQLite;
each round on fresh stores. No Ray, no Tune: only the stores' cost. Prints wall and CPU milliseconds per result
and per trial (and Optuna's part of the CPU), medians over the rounds, and two ratios: the wall
time per result of WAL against the defaults, and Optuna's CPU per trial (ask, sampling, reports,
tell) in a journal file against SQLite with WAL.

    python bench/store_writes.py [--tiny] [--rounds R] [--trials T] [--epochs E]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

import common
from cellseg.config import flatten, load_config
from cellseg.sqlite_commits import WAL_ENV
from cellseg.task import metric_names
from cellseg.tracking import Tracker
from search.space import SearchSpace, load_space
from search.study_file import JOURNAL_FILE, SQLITE_FILE, open_study_storage

EXPERIMENT = "store-writes"
# WAL_ENV's value and where the Optuna study lies, per variant
VARIANTS = {
    "SQLite defaults": ("0", "sqlite"),
    "WAL + NORMAL": ("1", "sqlite"),
    "WAL, study journal": ("1", "journal"),
}
LOSSES = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


class Clock:
    """Wall and CPU seconds summed over the blocks it times."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def one_round(
    folder: Path,
    template: Path,
    space: SearchSpace,
    params: dict[str, Any],
    trials: int,
    epochs: int,
    study_in: str,
) -> dict[str, float]:
    """Milliseconds per result and per trial (wall, CPU; Optuna's part of the CPU) of ``trials``
    trials of ``epochs`` results on fresh stores in ``folder``, the study in ``study_in``
    (``sqlite`` or ``journal``)."""
    folder.mkdir()
    shutil.copy(template, folder / "mlflow.db")
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
    tracker.experiment_id(EXPERIMENT)
    storage = open_study_storage(folder / (JOURNAL_FILE if study_in == "journal" else SQLITE_FILE))
    study = optuna.create_study(
        storage=storage, study_name="s", direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
    )
    per_trial, per_result, optuna_trial, optuna_result = Clock(), Clock(), Clock(), Clock()
    names = [*metric_names(), *(f"train_{k}" for k in LOSSES), "epoch", "lr", "epoch_train_s", "epoch_val_s"]
    for number in range(trials):
        with per_trial:
            run_id = tracker.start_run(
                EXPERIMENT, f"trial-{number}", params=params, tags={"ray.trial_id": str(number)}
            )
            with optuna_trial:
                trial = study.ask()
                space(trial)
        for epoch in range(1, epochs + 1):
            value = 0.5 * (1 - 1 / (epoch + number % 7))
            with per_result:
                tracker.log_metrics(run_id, {name: value for name in names}, step=epoch)
                with optuna_result:
                    trial.report(value, epoch)
        with per_trial:
            with optuna_trial:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            tracker.end_run(run_id, "KILLED")
    results = trials * epochs
    return {
        "result wall ms": 1000 * per_result.wall / results,
        "result CPU ms": 1000 * per_result.cpu / results,
        "trial wall ms": 1000 * per_trial.wall / trials,
        "trial CPU ms": 1000 * per_trial.cpu / trials,
        "Optuna CPU ms/trial": 1000 * (optuna_trial.cpu + optuna_result.cpu) / trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2 rounds of 3 trials of 3 results: seconds")
    parser.add_argument(
        "--rounds", type=int, help="rounds per variant, alternating (default 5; 2 with --tiny)"
    )
    parser.add_argument("--trials", type=int, help="trials per round (default 20; 3 with --tiny)")
    parser.add_argument("--epochs", type=int, help="results per trial (default 4; 3 with --tiny)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.tiny else 5)
    trials = args.trials or (3 if args.tiny else 20)
    epochs = args.epochs or (3 if args.tiny else 4)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_config(common.TRIALS / "demo.yaml")
    space = load_space(common.TRIALS / "space_demo.yaml", base)
    print(common.machine())
    print(f"{rounds} rounds per variant of {trials} trials of {epochs} results")
    figures: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        folder = Path(tmp)
        os.environ[WAL_ENV] = "0"
        template = folder / "template.db"
        Tracker(f"sqlite:///{template}").check()  # MLflow's migrations, once, outside the timing
        for n in range(rounds + 1):  # round 0 warms up (imports, SQLAlchemy's caches), not counted
            order = list(VARIANTS.items())[:: 1 if n % 2 else -1]  # each variant first in turn
            for i, (variant, (wal, study_in)) in enumerate(order):
                os.environ[WAL_ENV] = wal  # read when a connection opens: each round's are new
                made = one_round(
                    folder / f"{n}-{i}", template, space, flatten(base), trials, epochs, study_in
                )
                if n:
                    figures[variant].append(made)
    keys = list(figures["SQLite defaults"][0])
    medians = {v: {k: statistics.median(r[k] for r in rows) for k in keys} for v, rows in figures.items()}
    common.print_table(["variant", *keys], [[v, *m.values()] for v, m in medians.items()])
    common.print_ratio(
        "wall time per result, WAL/defaults",
        medians["WAL + NORMAL"]["result wall ms"] / medians["SQLite defaults"]["result wall ms"],
    )
    common.print_ratio(
        "Optuna CPU per trial, study journal/SQLite with WAL",
        medians["WAL, study journal"]["Optuna CPU ms/trial"] / medians["WAL + NORMAL"]["Optuna CPU ms/trial"],
    )


if __name__ == "__main__":
    main()
