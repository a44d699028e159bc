"""Search Mask R-CNN configurations with Ray Tune + Optuna (TPE) + ASHA, recorded in MLflow.

    python search/run.py --num-samples 40

With no other flag it runs on the embedded default: local Ray, a synthetic demo dataset made
once under .cellseg/, the demo space and preset (sized for 2 CPU cores), MLflow in ./mlflow.db.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # python search/run.py: search/ is not installed, the repo holds it
    sys.path.insert(0, str(REPO))

import optuna
import ray
import yaml
from mlflow.exceptions import MlflowException
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from cellseg.best_run import Candidate, candidate, export_order, first_kept
from cellseg.cli import at_least
from cellseg.config import Config, config_to_dict, load_config
from cellseg.data import DataFingerprint, dataset_fingerprint, make_synthetic_dataset, scan_train
from cellseg.errors import ConfigError, DataError, TrackingError
from cellseg.telemetry_off import switch_off_telemetry
from cellseg.tracking import PARENT_TAG, SEARCH_TAG, SOURCE_TAG, RunRecord, Tracker, is_unavailable
from cellseg.weights import resolve_weights
from search.bounded_history import BoundedHistorySampler
from search.continuation import (
    CONTINUE,
    INHERITED,
    PARENT_SOURCE,
    RESEED,
    SETTINGS,
    check_continue_flags,
    check_unchanged,
    continued_args,
    given_flags,
    next_phase,
    phase_kind,
    record_phase,
    recorded_phases,
    search_to_continue,
    settings_argv,
    without_continue,
)
from search.driver_drill import DRILL_ENV, parse_drill
from search.efficiency import Efficiency, efficiency, trial_slots
from search.faults import FAULT_ENV, parse_fault
from search.linked_storage import links_checkpoints, storage_filesystem
from search.mlflow_callback import MlflowTrialLogger
from search.mlflow_writer import JOURNAL, adopt_outbox, segments
from search.ranking_trust import assess_ranking
from search.reseed import (
    RepeatTags,
    SeededChoice,
    check_reseed_flags,
    plan_repeats,
    repeat_tuner,
    seeded_choice,
)
from search.result_file import needs_default_loggers, result_logger
from search.scheduler import SearchScheduler
from search.searcher import StudySearcher
from search.space import SearchSpace, load_space
from search.storage import StorageError, check_storage
from search.study_file import dashboard_command, prepare_study_file, study_path, study_storage
from search.summary import SearchFailed, SearchSummary, as_exported, log_summary, summarize
from search.trainable import REUSE_WORKERS, WORKER_RUNTIME_ENV, train_trial, trial_dirname
from search.trial_runs import drop_beyond_top
from search.tune_inference import DEFAULT_TRIALS, tune_inference
from search.warm_start import WarmStart, warm_start

log = logging.getLogger("cellseg.search")

# "medium": the "easy" set saturated at AP50 1.000, which hid every difference between trials
DEMO_DATA = REPO / ".cellseg" / "demo-medium"
DEMO_SIZE = {"n_train": 26, "n_test": 6, "seed": 0, "profile": "medium"}
DEFAULT_KEEP_TOP = 5  # checkpoints kept: enough for export --ensemble and a second choice
TUNING_FAILED = 3  # exit code: the search finished, --tune-inference failed
WARM_START_TAG = "cellseg.warm_start"  # on the parent run: the searches it learned from
STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"
SCORE_ONLY_ENV = "TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE"
DEFAULT_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
CLUSTER_PENDING_TRIALS = 8  # cluster.yaml's max_workers: GPU nodes asked for at once
# A failed MLflow request is queued and retried by the MLflow writer's outbox, so the client's own
# retries (7, about 4 minutes by default) would only stall the driver while the store is down.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset folder (default: synthetic demo data, made if absent)")
    p.add_argument("--space", default=str(REPO / "trials" / "space_demo.yaml"), help="search space YAML")
    p.add_argument("--base", default=str(REPO / "trials" / "demo.yaml"), help="base config YAML")
    p.add_argument("--num-samples", type=int, default=40, help="trials to run")
    p.add_argument(
        "--max-epochs",
        type=int,
        help="epochs of a trial that ASHA never stops (default: the base config's train.epochs)",
    )
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA keeps 1/this per rung")
    gpus_help = (
        "fractions share a GPU (default without --address: 1 if this machine has GPUs, else 0; "
        "needed with --address unless the base config's train.device is cpu)"
    )
    p.add_argument("--gpus-per-trial", type=float, help=gpus_help)
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--max-concurrent", type=int, default=0, help="0: as many as resources allow")
    p.add_argument(
        "--max-pending-trials",
        type=int,
        help="trials waiting for resources at once, "
        "each of which can make the autoscaler start a node (default: --max-concurrent "
        f"if set, else {CLUSTER_PENDING_TRIALS} with --address, 1 without)",
    )
    p.add_argument(
        "--max-failures", type=int, default=0, help="retries of a failing trial from its last checkpoint"
    )
    p.add_argument("--address", help="an existing Ray cluster ('auto'); default: start Ray locally")
    p.add_argument(
        "--storage",
        default=str(REPO / "runs" / "search"),
        help="trial checkpoints: local dir, shared file system or s3://bucket/path",
    )
    p.add_argument("--experiment", default="cellseg", help="MLflow experiment")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    p.add_argument("--name", help="search name (default search-<time>); needed with --resume")
    p.add_argument("--resume", action="store_true", help="continue the search --name after a crash")
    p.add_argument("--seed", type=int, default=0, help="seeds the TPE sampler")
    p.add_argument(
        "--fault-drill",
        action="store_true",
        help=f"let trials fail on purpose as {FAULT_ENV} in the workers' environment "
        "says (docs/reliability.md); without it trials never read it",
    )
    p.add_argument("--time-budget", type=float, help="stop starting trials after this many seconds")
    p.add_argument(
        "--min-free-gb",
        type=float,
        default=2.0,
        help="refuse to start when local storage has less free space",
    )
    p.add_argument(
        "--tune-inference",
        type=at_least(1),
        nargs="?",
        const=DEFAULT_TRIALS,
        metavar="TRIALS",
        help="after the search, tune the best trial's inference settings on cached validation "
        f"predictions (cellseg tune-inference --best with its defaults; TRIALS settings, default "
        f"{DEFAULT_TRIALS}); export --best then uses them when they beat the model's own. When "
        f"the search finished but this tuning fails, the driver says so and exits "
        f"{TUNING_FAILED}",
    )
    p.add_argument(
        "--tune-inference-ensemble",
        type=int,
        default=1,
        metavar="K",
        help="with --tune-inference: tune the ensemble of the K best trials instead (cellseg "
        "tune-inference --best --ensemble K: K times the validation passes; the ensemble size "
        "1..K is searched; export --best --ensemble K then uses the settings; default 1)",
    )
    p.add_argument(
        "--keep-top",
        type=int,
        default=DEFAULT_KEEP_TOP,
        help="keep the best checkpoint of only the K best ended trials, in export --best's order "
        "(the rest keep metrics, params and config in MLflow; 0 keeps every checkpoint; "
        "re-seeded runs are ranked once the re-seeding has ended, by their configuration's mean). Disk: "
        "about K best.pt files, once, in MLflow; while running, also a running trial's latest "
        "checkpoints (best.pt, last.pt) in --storage (docs/search.md)",
    )
    p.add_argument(
        "--reseed-top",
        type=int,
        default=0,
        metavar="K",
        help="after the search, train the K best configurations that ran every epoch again with "
        "--reseeds other training seeds, and choose the winner (the run export --best takes) by "
        "the mean of the base config's train.metric over seeds; costs K x S extra full trainings "
        "(default 0: off)",
    )
    p.add_argument(
        "--reseeds",
        type=int,
        default=2,
        metavar="S",
        help="other seeds per re-seeded configuration (default 2)",
    )
    p.add_argument(
        "--reseed-split",
        action="store_true",
        help="re-seeded trainings also move the validation split (data.split_seed) with the seed",
    )
    p.add_argument(
        "--warm-start",
        action="append",
        default=[],
        metavar="NAME",
        help="add the finished and pruned trials of the earlier search NAME (same --storage) "
        "that fit this space to the new search's Optuna study, so TPE starts informed; repeatable",
    )
    p.add_argument(
        "--continue",
        dest="continue_search",
        metavar="NAME",
        help="add --num-samples trials to the finished search NAME: same Optuna study and parent "
        "run; its data, base, space, storage, epochs, ASHA, resources, seed and --keep-top are "
        "reused (given again, they must be the same; the space and base files and the dataset "
        "must not have changed), and its --reseed-top, --reseeds, --reseed-split and --ci-top unless given",
    )
    p.add_argument(
        "--ci-top",
        type=int,
        default=5,
        metavar="N",
        help="after the search, a 95%% bootstrap interval of segm_AP50 for the N best trials: "
        "each one's best checkpoint (from its MLflow run; none for trials --keep-top dropped) "
        "with the validation predictions it stores (a checkpoint without them predicts the "
        "validation split once more in the driver, on a GPU if the driver has one); 0: off",
    )
    p.add_argument(
        "--mlflow-wait",
        type=float,
        default=600,
        help="seconds to wait at the end for an unavailable MLflow store",
    )
    return p


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def search_name(name: str | None, resume: bool) -> str:
    """The search's name: ``name``, else ``search-<time>``; ``--resume`` needs a name."""
    if resume and not name:
        raise ConfigError("--resume needs --name, the name printed when the search started")
    return name or time.strftime("search-%Y%m%d-%H%M%S")


def check_fault_drill(spec: str | None, drill: bool) -> None:
    """Refuse a stray or malformed fault drill (``CELLSEG_FAULT``) before Ray starts."""
    if spec and not drill:
        raise ConfigError(
            f"{FAULT_ENV}={spec!r} is set but --fault-drill is not: unset it, or "
            "pass --fault-drill to make trials fail on purpose"
        )
    _parsed_or_config_error(parse_fault, spec)


def check_driver_drill(spec: str | None) -> None:
    """Refuse a malformed driver drill (``CELLSEG_DRIVER_DRILL``) before Ray starts."""
    _parsed_or_config_error(parse_drill, spec)


def _parsed_or_config_error(parse: Callable[[str], object], spec: str | None) -> None:
    """``parse(spec)`` when ``spec`` is set, its ValueError as a ConfigError."""
    if spec:
        try:
            parse(spec)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def data_root(data: str | None) -> Path:
    """The dataset folder, checked for its layout (DataError naming it) before Ray starts;
    without ``data`` the synthetic demo dataset, made once."""
    if data:
        root = Path(data).resolve()
        scan_train(root)
        return root
    if not (DEMO_DATA / "train").is_dir():
        log.info("making the synthetic demo dataset in %s", DEMO_DATA)
        make_synthetic_dataset(DEMO_DATA, **DEMO_SIZE)
    return DEMO_DATA


def load_base(base_path: Path, root: Path, max_epochs: int | None) -> Config:
    """The base config on dataset ``root``, its ``train.epochs`` replaced by ``max_epochs``."""
    overrides = [f"data.root={root}"]
    if max_epochs:
        overrides.append(f"train.epochs={max_epochs}")
    return load_config(base_path, overrides)


def check_validated(base: Config, space: SearchSpace, base_path: Path) -> None:
    """A search ranks trials by their validation metric: refuse ``data.val_fraction`` 0 (no
    validation split) in the base config or among the space's values."""
    searched = [p for p in space.params if p.key == "data.val_fraction" and p.contains(0.0)]
    if base.data.val_fraction == 0 or searched:
        where = f"{space.source}: data.val_fraction" if searched else f"{base_path}: data.val_fraction"
        raise ConfigError(
            f"{where} may be 0, but a search ranks trials by their validation {base.train.metric}; "
            "give it a value in (0, 1) (0, training on every image, is for cellseg refit after the search)"
        )


def stage_weights(base: Config, space: SearchSpace) -> list[Path]:
    """Every weights file a trial may load, resolved once before any trial starts: ImageNet files
    are downloaded into this node's torch hub cache now (trials on this node find them there; other
    nodes stage them at setup, see cluster.yaml), and a missing one fails the search in seconds."""
    choices = {p.key: p.values for p in space.params if p.kind == "choice"}
    backbones = {base.model.backbone, *choices.get("model.backbone", ())}
    names = {base.model.weights, *choices.get("model.weights", ())}
    found = {resolve_weights(name, backbone) for name in names for backbone in backbones}
    return sorted(path for path in found if path is not None)


def check_gpu_request(gpus_per_trial: float | None, address: str | None, device: str) -> None:
    """On an existing cluster a GPU config needs an explicit ``--gpus-per-trial``: a cluster whose
    GPU nodes are not started yet has no GPUs, so trials would silently train on CPU."""
    if gpus_per_trial is None and address and device != "cpu":
        raise ConfigError(
            f"--address {address} with train.device {device!r} in the base config needs "
            "--gpus-per-trial (1: a GPU per trial, 0.5: two trials share one, 0: CPU only); the "
            "cluster's GPU nodes may not be started yet, so a default would train on CPU"
        )


def trial_gpus(gpus_per_trial: float | None) -> float:
    """``--gpus-per-trial``, else 1 when the (local) cluster has GPUs and 0 when it has none."""
    if gpus_per_trial is not None:
        return gpus_per_trial
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def pending_trials(requested: int | None, max_concurrent: int, address: str | None) -> int:
    """How many trials may wait for resources at once. Tune's default with a searcher is one, so
    an autoscaling cluster would start its GPU nodes one after another."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--max-pending-trials must be at least 1, got {requested}")
        return requested
    return max_concurrent or (CLUSTER_PENDING_TRIALS if address else 1)


def metric_every_epoch(base: Config, space: SearchSpace) -> bool:
    """False when some trial may skip validation (``train.eval_every`` > 1): those epochs report
    no metric, which Tune's strict metric check would refuse."""
    return base.train.eval_every == 1 and "train.eval_every" not in space.keys


def storage_paths(storage: str, name: str) -> tuple[str, Path]:
    """Tune's storage path, and a local folder for this search's Optuna study and MLflow journal."""
    if "://" in storage:
        return storage, Path.home() / ".cellseg" / "searches" / name
    path = Path(storage).resolve()
    return str(path), path / name


def open_parent_run(
    tracker: Tracker,
    *,
    experiment: str,
    name: str,
    resume: bool,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    texts: Mapping[str, str],
    dataset: DataFingerprint | None = None,
) -> str:
    """The search's parent run: created with ``params``, ``tags``, ``texts`` (artifact path ->
    content) and its ``dataset`` for a new search, found again by name and set RUNNING for
    ``resume``."""
    found = tracker.records(experiment, f"tags.`{SEARCH_TAG}` = '{name}'")
    if resume:
        if not found:
            raise TrackingError(
                f"no search named {name!r} in experiment {experiment!r} of {tracker.uri} to resume"
            )
        tracker.reopen_run(found[0].run_id)
        return found[0].run_id
    if found:
        raise TrackingError(
            f"a search named {name!r} exists already; pass --resume to continue it or choose another --name"
        )
    run_id = tracker.start_run(
        experiment, name, params=params, tags={SEARCH_TAG: name, **tags}, dataset=dataset
    )
    for artifact_path, text in texts.items():
        tracker.log_text(run_id, text, artifact_path)
    return run_id


def new_tuner(
    trainable: Any,
    *,
    name: str,
    storage_path: str,
    space: SearchSpace,
    metric: str,
    max_epochs: int,
    num_samples: int,
    seed: int,
    study_file: Path,
    max_concurrent: int,
    grace_period: int,
    reduction_factor: float,
    time_budget_s: float | None,
    max_failures: int,
    callback: MlflowTrialLogger,
    study_name: str | None = None,
    prior_trials: Sequence[optuna.trial.FrozenTrial] = (),
    continue_study: bool = False,
) -> tune.Tuner:
    """A Tuner for a new search: Optuna's TPE over a bounded history (search/bounded_history.py;
    the space's baselines first, after the warm start's ``prior_trials``) and ASHA; with
    ``continue_study``, more trials of the existing study ``study_name`` (default: ``name``),
    baselines not repeated."""
    searcher = StudySearcher(
        space,
        metric=metric,
        mode="max",
        study_file=study_file,
        study_name=study_name or name,
        sampler=BoundedHistorySampler(optuna.samplers.TPESampler(seed=seed)),
        max_epochs=max_epochs,
        points_to_evaluate=() if continue_study else space.baseline_points(),
        prior_trials=prior_trials,
        continue_study=continue_study,
    )
    search_alg = ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            search_alg=search_alg,
            num_samples=num_samples,
            scheduler=SearchScheduler(
                time_attr="training_iteration",
                max_t=max_epochs,
                grace_period=grace_period,
                reduction_factor=reduction_factor,
            ),
            time_budget_s=time_budget_s,
            trial_dirname_creator=trial_dirname,
            reuse_actors=REUSE_WORKERS,
        ),
        run_config=run_config(name, storage_path, callback, max_failures),
    )


def run_config(
    name: str, storage_path: str, callback: MlflowTrialLogger, max_failures: int
) -> tune.RunConfig:
    """Where a Tune experiment of the search keeps its trials, its MLflow callback, and the
    writer of each trial's ``result.json`` (every result, read back for the summary, the ranking
    and the efficiency figures): in the trial's folder for local storage
    (:mod:`search.result_file`), else Tune's JSON logger."""
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem(storage_path),  # local: checkpoints hard-linked
        callbacks=[callback, result_logger(links_checkpoints(storage_path))],
        # every checkpoint: a limit would force a save of Tune's whole state every few results;
        # the callback removes what no restore needs (search/checkpoint_cleanup.py)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        failure_config=tune.FailureConfig(max_failures=max_failures),
    )


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` set in the environment while the block runs; the previous values restored."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tune_environment(
    strict_metrics: bool, *, default_loggers: bool = False
) -> contextlib.AbstractContextManager[None]:
    """Tune's settings for ``fit`` that Ray 2.60 reads only from the environment, restored after.

    - ``TUNE_DISABLE_STRICT_METRIC_CHECKING=1`` unless every epoch reports the metric (the
      driver's TuneController reads it on every result; there is no Tuner option for it);
    - ``TUNE_DISABLE_SIGINT_HANDLER=1``: Ctrl-C raises KeyboardInterrupt at once, so the driver
      can mark the parent run KILLED; the search resumes as after any driver crash;
    - ``TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE=1``: Tune keeps every checkpoint a trial
      reports (:func:`run_config`), and with this its saved state lists them without their results
      (the latest keeps its own), so the state does not grow by a result per epoch;
    - ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``, unless ``default_loggers``: no CSV and
      TensorBoard files per trial, which nothing reads (:func:`run_config` adds the writer of
      ``result.json``, which the summary, the ranking and the efficiency figure read back). A
      restored experiment runs with the callbacks it was saved with, and one saved before the
      search passed a JSON logger itself has none: it needs Tune's default loggers
      (:func:`search.result_file.needs_default_loggers`).
    """
    loggers_off = {} if default_loggers else {DEFAULT_LOGGERS_ENV: "1"}
    fixed = {SIGINT_ENV: "1", SCORE_ONLY_ENV: "1", **loggers_off}
    return scoped_environ({**fixed, **({} if strict_metrics else {STRICT_METRIC_ENV: "1"})})


class SearchInterrupted(Exception):
    """The search was stopped with Ctrl-C; it can be resumed."""


def fit_tuner(
    tuner: tune.Tuner, *, max_pending: int, strict_metrics: bool, default_loggers: bool = False
) -> list[tune.Result]:
    """Run ``tuner`` to its end in the search's Tune environment (:func:`tune_environment`,
    with Tune's ``default_loggers`` for a restored experiment that needs them) with at most
    ``max_pending`` trials waiting for resources; its trials' results."""
    environment = tune_environment(strict_metrics, default_loggers=default_loggers)
    with scoped_environ({PENDING_TRIALS_ENV: str(max_pending)}), environment:
        return list(tuner.fit())  # PENDING_TRIALS_ENV is read when fit starts


@contextlib.contextmanager
def parent_closed_on_error(tracker: Tracker, parent_run_id: str, resume_command: str) -> Iterator[None]:
    """Close the parent run if the block raises: KILLED for Ctrl-C (SearchInterrupted, naming
    ``resume_command``), FAILED otherwise. Left RUNNING when MLflow itself is unavailable: a
    TrackingError, naming ``resume_command`` when the store went down in the block (a read or
    write of the driver's own, e.g. at the re-seeding or the search's end)."""
    try:
        yield
    except (MlflowException, TrackingError) as exc:
        if is_unavailable(exc):  # a TrackingError of the search's own says what to do already
            raise TrackingError(
                f"MLflow at {tracker.uri} became unavailable ({exc}). The trials' results are kept "
                f"in Tune's storage and the writes not applied in the journal; once MLflow is back, "
                f"continue with: {resume_command}"
            ) from exc
        if isinstance(exc, MlflowException):
            _close_failed(tracker, parent_run_id, exc)
        raise
    except BaseException as exc:
        _close_failed(tracker, parent_run_id, exc)
        if isinstance(exc, KeyboardInterrupt):
            raise SearchInterrupted(
                f"interrupted; the parent run is KILLED. Continue the search with: {resume_command}"
            ) from None
        raise


def _close_failed(tracker: Tracker, parent_run_id: str, exc: BaseException) -> None:
    """The parent run FAILED (KILLED for Ctrl-C) with ``exc``; logged when that fails too."""
    try:
        tracker.fail_run(parent_run_id, exc)
    except Exception as mlflow_exc:  # keep the search's own error in front
        log.error("could not close the parent run %s: %s", parent_run_id, mlflow_exc)


def check_writes_applied(local_dir: Path, tracker: Tracker, name: str) -> None:
    """TrackingError when the trials ended but MLflow writes are still in the writer's journal."""
    if segments(local_dir / JOURNAL):
        raise TrackingError(
            f"the trials ended but MLflow at {tracker.uri} stayed unavailable; their last writes "
            f"are kept in {local_dir / JOURNAL}. Bring the store back, then run: python "
            f"search/run.py --resume --name {name} (with the same other flags)"
        )


def finish_search(
    tracker: Tracker,
    parent_run_id: str,
    results: Sequence[tune.Result],
    *,
    name: str,
    metric: str,
    max_epochs: int,
    local_dir: Path,
    experiment: str,
    started: float,
    trained: Sequence[tune.Result],
    slots: int,
) -> tuple[SearchSummary, Efficiency]:
    """The summary and efficiency of an ended search, logged to the parent run, which is then
    FINISHED; SearchFailed (naming the first error) when no trial succeeded. ``started``: the
    driver's start (seconds since the epoch); ``trained``: every trial this driver ran, repeats
    included."""
    wall_s = time.time() - started
    summary = summarize(results, metric=metric, max_epochs=max_epochs, wall_s=wall_s)
    ended = ended_trials(tracker, experiment, parent_run_id)
    if ended:  # the run export --best takes; its best.pt lies in MLflow, no longer in Tune's storage
        summary = as_exported(summary, first_kept(export_order(ended)))
    spent = efficiency(trained, wall_s=wall_s, slots=slots, since=started)
    study = optuna.load_study(study_name=name, storage=study_storage(study_path(local_dir)))  # read only
    log_summary(tracker, parent_run_id, results, summary, study, metric=metric, out_dir=local_dir / "summary")
    tracker.log_metrics(parent_run_id, spent.metrics(), step=0)
    tracker.end_run(parent_run_id, "FINISHED")
    return summary, spent


def ended_trials(tracker: Tracker, experiment: str, parent_run_id: str) -> list[Candidate]:
    """The exportable ended trials of the search ``parent_run_id``, repeats included."""
    children = tracker.records(experiment, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return [c for c in map(candidate, children) if c is not None]


def continued(args: argparse.Namespace, argv: Sequence[str]) -> tuple[argparse.Namespace, RunRecord | None]:
    """``args`` for ``--continue NAME`` (the command line ``argv``): the earlier search's name and
    settings, and its parent run; else ``args`` unchanged and None."""
    if not args.continue_search:
        return args, None
    check_continue_flags(args)
    tracker = Tracker(args.tracking_uri)
    tracker.check()
    parent = search_to_continue(tracker, args.experiment, args.continue_search)
    return continued_args(args, build_parser(), parent, given_flags(build_parser(), argv)), parent


def unsaved_note(name: str, phase: str, path: str) -> str:
    """What becomes of the search's Tune experiment ``phase`` (at ``path``), which its driver
    recorded but did not run long enough for Tune to save its state."""
    stopped = f"{path} has no saved Tune state (its driver stopped before Tune saved it); skipped"
    if phase_kind(name, phase) == CONTINUE:
        return (
            f"{stopped}: the trials that --continue was adding are not run. Once this search has "
            f"finished, add them again with: python search/run.py --continue {name} --num-samples N"
        )
    if phase_kind(name, phase) == RESEED:
        return f"{stopped}: with --reseed-top, the repeats it was to train are planned again"
    return stopped


def resume_command_for(args: argparse.Namespace, name: str, argv: Sequence[str]) -> str:
    """The command that resumes this invocation (the command line ``argv``) after a crash: every
    flag given, and for ``--continue`` the settings taken from the earlier search instead."""
    rest = [a for a in argv if a != "--resume"]
    if args.continue_search:
        given = given_flags(build_parser(), argv)
        recorded = [d for d in (*SETTINGS, *INHERITED) if d not in given]
        rest = [*settings_argv(args, recorded), *without_continue(rest)]
    return f"python search/run.py --resume --name {name} {' '.join(rest)}"


def check_run_flags(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Refuse before Ray starts: a stray or malformed fault drill and a malformed driver drill (as
    ``environ`` sets them), a negative ``--ci-top`` or ``--keep-top``, an ensemble to tune that
    cannot be."""
    check_fault_drill(environ.get(FAULT_ENV), args.fault_drill)
    check_driver_drill(environ.get(DRILL_ENV))
    if args.ci_top < 0:
        raise ConfigError(f"--ci-top must be 0 (off) or more, got {args.ci_top}")
    if args.keep_top < 0:
        raise ConfigError(f"--keep-top must be 0 (keep every checkpoint) or more, got {args.keep_top}")
    check_tune_ensemble(args.tune_inference_ensemble, args.tune_inference, args.keep_top)


def check_tune_ensemble(ensemble: int, tune_trials: int | None, keep_top: int) -> None:
    """ConfigError for an ensemble to tune that cannot be: below 1, without --tune-inference, or
    more trials than --keep-top keeps checkpoints of."""
    if ensemble < 1:
        raise ConfigError(f"--tune-inference-ensemble {ensemble}: give 1 or more")
    if ensemble > 1 and not tune_trials:
        raise ConfigError("--tune-inference-ensemble needs --tune-inference")
    if 0 < keep_top < ensemble:
        raise ConfigError(
            f"--tune-inference-ensemble {ensemble} needs the checkpoints of {ensemble} trials, but "
            f"--keep-top {keep_top} keeps {keep_top}; raise --keep-top"
        )


@dataclass(frozen=True)
class SearchInputs:
    """The files a search reads, checked: the base config on its dataset, and the space."""

    base_path: Path
    space_path: Path
    root: Path
    base: Config
    space: SearchSpace


def search_inputs(args: argparse.Namespace) -> SearchInputs:
    """``--data``, ``--base`` and ``--space`` loaded and checked (a validation split, a GPU request
    the cluster can honour) before Ray starts."""
    base_path, space_path = Path(args.base).resolve(), Path(args.space).resolve()
    root = data_root(args.data)
    base = load_base(base_path, root, args.max_epochs)
    space = load_space(space_path, base)
    check_validated(base, space, base_path)
    check_gpu_request(args.gpus_per_trial, args.address, base.train.device)
    return SearchInputs(base_path, space_path, root, base, space)


def earlier_trials(names: Sequence[str], storage: str, inputs: SearchInputs) -> WarmStart:
    """The trials of the ``--warm-start`` searches ``names`` (in ``storage``) that fit the space,
    with their notes printed."""
    studies = {n: study_path(storage_paths(storage, n)[1]) for n in names}
    warm = warm_start(studies, inputs.space, inputs.base.train.metric, inputs.base.train.epochs)
    for line in warm.notes():
        print(line)
    return warm


def parent_artifacts(
    inputs: SearchInputs, base_dict: dict[str, Any]
) -> tuple[dict[str, Path], dict[str, str]]:
    """The artifacts the parent run keeps of the search's inputs, as (artifact -> the file it is
    made from, artifact -> its text): the space file as given and the base config as loaded."""
    space_path, base_path = inputs.space_path, inputs.base_path
    files = {f"search/{space_path.name}": space_path, f"search/base-{base_path.name}": base_path}
    texts = dict(zip(files, [space_path.read_text(), yaml.safe_dump(base_dict, sort_keys=False)]))
    return files, texts


def start_ray(address: str | None) -> None:
    """Ray, local or joined at ``address``; its processes and the workers without telemetry."""
    no_telemetry = switch_off_telemetry()  # the local Ray's processes inherit it
    ray.init(
        address=address,
        include_dashboard=False,
        ignore_reinit_error=True,
        runtime_env={**WORKER_RUNTIME_ENV, "env_vars": no_telemetry},
    )  # workers get it too


def parent_params(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The parent run's parameters: every flag that has a value, and the search's name."""
    return {k: v for k, v in {**vars(args), "name": name}.items() if v is not None}


def parent_tags(warm: WarmStart, cluster: Mapping[str, float], command: Sequence[str]) -> dict[str, str]:
    """The parent run's tags: its source, the code's commit, the ``cluster``'s resources, the
    ``command`` line, and the searches it was warm-started from."""
    return {
        SOURCE_TAG: PARENT_SOURCE,
        "git_commit": _git_commit(),
        "ray.cluster_resources": str(cluster),
        "command": " ".join(command),
        **({WARM_START_TAG: warm.tag()} if warm.carried else {}),
    }


@dataclass
class SearchPhases:
    """What the Tune experiments ("phases") of one search share, and how one runs; ``trained``
    collects every trial this driver ran."""

    args: argparse.Namespace
    name: str
    tracker: Tracker
    parent_run_id: str
    inputs: SearchInputs
    base_dict: dict[str, Any]
    storage_path: str
    local_dir: Path
    max_pending: int
    trainable: Any
    trained: list[tune.Result] = field(default_factory=list)
    study_file: Path = field(init=False)  # the search's Optuna study (search/study_file.py)

    def __post_init__(self) -> None:
        self.study_file = study_path(self.local_dir)
        prepare_study_file(self.study_file)  # before Tune restores a searcher that opens it
        adopt_outbox(self.local_dir, self.local_dir / JOURNAL)  # an older search's queued writes

    def trial_logger(
        self, phase: str, trial_tags: RepeatTags | None = None, keep_top: int | None = None
    ) -> MlflowTrialLogger:
        """The MLflow callback of experiment ``phase`` (``keep_top``: default ``--keep-top``)."""
        return MlflowTrialLogger(
            tracking_uri=self.tracker.uri,
            experiment=self.args.experiment,
            parent_run_id=self.parent_run_id,
            base=self.base_dict,
            max_epochs=self.inputs.base.train.epochs,
            metric=self.inputs.base.train.metric,
            journal=self.local_dir / JOURNAL,
            drain_timeout_s=self.args.mlflow_wait,
            search_name=self.name,
            phase=phase,
            keep_top=self.args.keep_top if keep_top is None else keep_top,
            trial_tags=trial_tags,
        )

    def fit(self, tuner: tune.Tuner, *, default_loggers: bool = False) -> list[tune.Result]:
        """Run ``tuner`` in Tune's environment for this search (:func:`fit_tuner`); its trials'
        results."""
        strict = metric_every_epoch(self.inputs.base, self.inputs.space)
        ended = fit_tuner(
            tuner, max_pending=self.max_pending, strict_metrics=strict, default_loggers=default_loggers
        )
        self.trained.extend(ended)
        return ended

    def search_tuner(self, phase: str, **more: Any) -> tune.Tuner:
        """A TPE + ASHA Tuner of ``--num-samples`` trials for experiment ``phase``."""
        args = self.args
        return new_tuner(
            self.trainable,
            name=phase,
            storage_path=self.storage_path,
            space=self.inputs.space,
            metric=self.inputs.base.train.metric,
            max_epochs=self.inputs.base.train.epochs,
            num_samples=args.num_samples,
            study_file=self.study_file,
            max_concurrent=args.max_concurrent,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            time_budget_s=args.time_budget,
            max_failures=args.max_failures,
            callback=self.trial_logger(phase),
            **more,
        )


def search_trainable(
    base_dict: Mapping[str, Any], fault_drill: bool, per_trial: Mapping[str, float], storage_path: str
) -> Any:
    """``train_trial`` on the base config with the resources ``per_trial`` (``CPU``, ``GPU``),
    hard-linking its checkpoints into a local ``storage_path`` (search/linked_storage.py)."""
    link = links_checkpoints(storage_path)
    return tune.with_resources(
        tune.with_parameters(train_trial, base=base_dict, fault_drill=fault_drill, link_checkpoints=link),
        {"cpu": per_trial["CPU"], "gpu": per_trial["GPU"]},
    )


def restored_results(search: SearchPhases, phases: Sequence[str]) -> list[tune.Result]:
    """For ``--resume`` or ``--continue``: the trials of the search's Tune experiments so far (its
    first and ``phases``), the last run on to its end with ``--resume``; re-seeded trials left out
    (they rank by their configuration's mean). An experiment Tune never saved is skipped with a
    note."""
    args, name = search.args, search.name
    experiments = [name, *phases]
    results: list[tune.Result] = []
    for phase in experiments if args.resume or args.continue_search else []:
        path = f"{search.storage_path.rstrip('/')}/{phase}"
        filesystem = storage_filesystem(path)
        if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
            print(unsaved_note(name, phase, path))
            continue
        restored = tune.Tuner.restore(
            path, search.trainable, resume_errored=True, storage_filesystem=filesystem
        )
        # only the last can be unfinished: each later one started after the one before ended
        unfinished = args.resume and phase == experiments[-1]
        if unfinished:
            ended = search.fit(restored, default_loggers=needs_default_loggers(path, filesystem))
        else:
            ended = list(restored.get_results())
        if phase_kind(name, phase) != RESEED:
            results += ended
    return results


def new_trials(search: SearchPhases, phases: list[str], warm: WarmStart) -> list[tune.Result]:
    """The trials this invocation adds: ``--num-samples`` more as the next ``continue`` experiment
    for ``--continue`` (recorded in ``phases`` first), the search's first experiment for a new
    search (after ``warm``'s trials), none for ``--resume``."""
    args, name = search.args, search.name
    if args.continue_search:
        phase = next_phase(name, CONTINUE, phases)
        try:
            record_phase(search.tracker, search.parent_run_id, phases, phase)
        except MlflowException as exc:
            if not is_unavailable(exc):
                raise
            raise TrackingError(
                f"MLflow at {search.tracker.uri} became unavailable ({exc}) before the trials of "
                f"--continue were recorded, so none ran. Once it is back, finish the search with the "
                f"resume command printed above, then add them again with: python search/run.py "
                f"--continue {name} --num-samples {args.num_samples}"
            ) from None
        print(f"continuing search {name} with {args.num_samples} more trials ({phase})")
        return search.fit(
            search.search_tuner(phase, study_name=name, continue_study=True, seed=args.seed + len(phases))
        )
    if not args.resume:
        return search.fit(search.search_tuner(name, seed=args.seed, prior_trials=warm.trials))
    return []


def reseed_best(search: SearchPhases, phases: list[str], results: Sequence[tune.Result]) -> None:
    """``--reseed-top``: train the best configurations of ``results`` that ran every epoch again
    with other seeds, as the next ``reseed`` experiment (recorded in ``phases`` first); a line
    when every repeat exists already."""
    args, name, tracker, base = search.args, search.name, search.tracker, search.inputs.base
    check_writes_applied(search.local_dir, tracker, name)
    repeats = plan_repeats(
        tracker.records(args.experiment, f"tags.`{PARENT_TAG}` = '{search.parent_run_id}'"),
        {r.metrics["trial_id"]: r.config for r in results if r.config and r.metrics},
        top=args.reseed_top,
        reseeds=args.reseeds,
        base_seed=base.train.seed,
        base_split_seed=base.data.split_seed,
        vary_split=args.reseed_split,
    )
    if not repeats:
        print(
            f"nothing to re-seed: the best {args.reseed_top} trials that ran every epoch have their "
            f"{args.reseeds} repeats already (or no trial ran every epoch)"
        )
        return
    phase = next_phase(name, RESEED, phases)
    record_phase(tracker, search.parent_run_id, phases, phase)
    print(f"re-seeding the best {args.reseed_top} configurations: {len(repeats)} more trainings ({phase})")
    # keep_top 0: a configuration's mean is known once all its seeds ended (conclude_search)
    logger = search.trial_logger(phase, RepeatTags(repeats), keep_top=0)
    config = run_config(phase, search.storage_path, logger, args.max_failures)
    search.fit(
        repeat_tuner(
            search.trainable,
            repeats,
            metric=base.train.metric,
            max_concurrent=args.max_concurrent,
            run_config=config,
        )
    )


@dataclass(frozen=True)
class SearchOutcome:
    """What the end of a search prints: its summary and efficiency, the choice by mean over seeds
    (with ``--reseed-top``) and how far the ranking can be trusted."""

    summary: SearchSummary
    spent: Efficiency
    choice: SeededChoice | None
    trust: list[str]

    def lines(self, metric: str) -> list[str]:
        return [
            *self.summary.lines(metric),
            self.spent.line(),
            *(self.choice.lines() if self.choice is not None else []),
            *self.trust,
        ]


def conclude_search(
    search: SearchPhases, results: Sequence[tune.Result], *, started: float, slots: int
) -> SearchOutcome:
    """Once every experiment ended: drop the checkpoints beyond ``--keep-top``, record the choice
    by mean over seeds, assess the ranking and finish the parent run (``finish_search``)."""
    args, tracker, parent_run_id = search.args, search.tracker, search.parent_run_id
    metric, max_epochs = search.inputs.base.train.metric, search.inputs.base.train.epochs
    if args.keep_top:  # once every phase ended, re-seeded configurations by their final mean
        drop_beyond_top(tracker, ended_trials(tracker, args.experiment, parent_run_id), args.keep_top)
    choice = seeded_choice(tracker.records(args.experiment, f"tags.`{PARENT_TAG}` = '{parent_run_id}'"))
    if choice is not None:
        tracker.set_tags(parent_run_id, choice.tags())
        tracker.log_text(parent_run_id, "\n".join(choice.lines()) + "\n", "summary/reseed_choice.txt")
    trust = assess_ranking(
        tracker,
        parent_run_id,
        results,
        experiment=args.experiment,
        metric=metric,
        max_epochs=max_epochs,
        ci_top=args.ci_top,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        out_dir=search.local_dir / "summary",
    )
    summary, spent = finish_search(
        tracker,
        parent_run_id,
        results,
        name=search.name,
        metric=metric,
        max_epochs=max_epochs,
        local_dir=search.local_dir,
        experiment=args.experiment,
        started=started,
        trained=search.trained,
        slots=slots,
    )
    return SearchOutcome(summary, spent, choice, trust)


def tune_chosen_inference(
    tracker: Tracker, *, experiment: str, search: str, data_root: str, trials: int, ensemble: int = 1
) -> list[str]:
    """``--tune-inference``: the inference settings of the run the search chose (of its
    ``ensemble`` best runs' ensemble), tuned (``trials`` settings); a line each."""
    with tempfile.TemporaryDirectory() as scratch:
        tuned = tune_inference(
            tracker,
            experiment=experiment,
            run_id=None,
            search=search,
            data_root=data_root,
            scratch=Path(scratch),
            trials=trials,
            ensemble=ensemble,
        )
    return [f"inference {key}: {value}" for key, value in tuned.items()]


def next_steps(
    tracker_uri: str, experiment: str, experiment_id: str, data_root: str, study: Path
) -> list[str]:
    """What to do after a search: compare its trials in MLflow's UI, export the submission,
    optionally refit; Optuna's plots of the ``study`` file."""
    runs_page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracker_uri.startswith("http"):
        compare = f"compare trials: open {tracker_uri.rstrip('/')}/{runs_page}"
    else:
        compare = (
            f"compare trials: MLFLOW_DISABLE_TELEMETRY=true mlflow ui --backend-store-uri {tracker_uri} --host 127.0.0.1 "
            f"--port 5000, then open http://127.0.0.1:5000/{runs_page}"
        )
    return [
        compare,
        f"write the submission: cellseg export --best --data {data_root} --experiment "
        f"{experiment} --tracking-uri {tracker_uri} --output test-results.json "
        "--zip submission.zip",
        f"retrain the best configuration on every training image (optional): cellseg refit --best "
        f"--data {data_root} --experiment {experiment} --tracking-uri {tracker_uri}, "
        "then export with --best --refit",
        f"Optuna's plots of the study (optional; pip install optuna-dashboard): {dashboard_command(study)}",
    ]


def run_search(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Validate everything, then run (resume, or continue) the search of the command line ``argv``
    (parsed: ``args``) and print its summary."""
    start = time.time()
    args, earlier = continued(args, argv)
    check_reseed_flags(args.reseed_top, args.reseeds)
    name = search_name(args.name, args.resume)
    check_run_flags(args, os.environ)
    inputs = search_inputs(args)
    max_pending = pending_trials(args.max_pending_trials, args.max_concurrent, args.address)
    warm = earlier_trials(args.warm_start, args.storage, inputs)
    for path in stage_weights(inputs.base, inputs.space):
        log.info("weights staged: %s", path)
    tracker = Tracker(args.tracking_uri)
    tracker.check()
    base_dict = config_to_dict(inputs.base)
    files, texts = parent_artifacts(inputs, base_dict)
    dataset = dataset_fingerprint(inputs.base.data)
    if earlier is not None:
        check_unchanged(tracker, earlier, texts, files, dataset.digest, inputs.root)
    storage_path, local_dir = storage_paths(args.storage, name)
    check_storage(storage_path, args.min_free_gb)
    local_dir.mkdir(parents=True, exist_ok=True)
    start_ray(args.address)
    parent_run_id = open_parent_run(
        tracker,
        experiment=args.experiment,
        name=name,
        resume=args.resume or bool(args.continue_search),
        params=parent_params(args, name),
        tags=parent_tags(warm, ray.cluster_resources(), sys.argv),
        texts=texts,
        dataset=dataset,
    )
    print(f"search {name}: MLflow parent run {parent_run_id} in {tracker.uri}")
    experiment_id = tracker.experiment_id(args.experiment)  # for the last lines, read while MLflow answers
    resume_command = resume_command_for(args, name, argv)
    print(f"resume after a crash with: {resume_command}")
    with parent_closed_on_error(tracker, parent_run_id, resume_command):
        per_trial = {"CPU": args.cpus_per_trial, "GPU": trial_gpus(args.gpus_per_trial)}
        search = SearchPhases(
            args,
            name,
            tracker,
            parent_run_id,
            inputs,
            base_dict,
            storage_path,
            local_dir,
            max_pending,
            trainable=search_trainable(base_dict, args.fault_drill, per_trial, storage_path),
        )
        phases = recorded_phases(tracker.record(parent_run_id))
        results = restored_results(search, phases)
        results += new_trials(search, phases, warm)
        if args.reseed_top:
            reseed_best(search, phases, results)
    check_writes_applied(local_dir, tracker, name)
    with parent_closed_on_error(tracker, parent_run_id, resume_command):
        slots = trial_slots(ray.cluster_resources(), per_trial, args.max_concurrent, args.num_samples)
        outcome = conclude_search(search, results, started=start, slots=slots)
    metric, data = inputs.base.train.metric, str(inputs.base.data.root)
    print("\n".join(outcome.lines(metric)))
    code = 0
    if args.tune_inference:
        try:
            tuned = tune_chosen_inference(
                tracker,
                experiment=args.experiment,
                search=name,
                data_root=data,
                trials=args.tune_inference,
                ensemble=args.tune_inference_ensemble,
            )
            print("\n".join(tuned))
        except (ConfigError, DataError, TrackingError, MlflowException) as exc:
            code = TUNING_FAILED
            print(
                f"search: the search finished and can be exported; tuning its inference settings "
                f"failed: {exc}. Tune them with cellseg tune-inference --best --data {data} --search "
                f"{name} --experiment {args.experiment} --tracking-uri {tracker.uri}, with the flags "
                "the error names (see cellseg tune-inference --help)",
                file=sys.stderr,
            )
    print("\n".join(next_steps(tracker.uri, args.experiment, experiment_id, data, search.study_file)))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return run_search(args, argv)
    except (ConfigError, DataError, TrackingError, StorageError) as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return 2
    except SearchFailed as exc:
        print(f"search: failed: {exc}", file=sys.stderr)
        return 1
    except SearchInterrupted as exc:
        print(f"search: {exc}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
