"""Search Mask R-CNN configurations with Ray Tune + Optuna (TPE) + ASHA, recorded in MLflow.

    python search/run.py --num-samples 40

With no other flag it runs on the embedded default: local Ray, a synthetic demo dataset made
once under .cellseg/, the demo space and preset (sized for 2 CPU cores), MLflow in ./mlflow.db.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import optuna
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from cellseg.config import ConfigError, config_to_dict, load_config
from cellseg.data import DataError, make_synthetic_dataset, scan_train
from cellseg.telemetry_off import switch_off_telemetry
from cellseg.tracking import Tracker, TrackingError
from search.faults import FAULT_ENV, parse_fault
from search.mlflow_callback import MlflowTrialLogger
from search.searcher import PruningAwareOptunaSearch
from search.space import load_space
from search.storage import StorageError, check_storage
from search.summary import log_summary, summarize
from search.trainable import train_trial, trial_dirname

log = logging.getLogger("cellseg.search")

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / ".cellseg" / "demo-data"
DEMO_SIZE = {"n_train": 30, "n_test": 6, "seed": 0, "profile": "easy"}
SEARCH_TAG = "cellseg.search_name"
OUTBOX = "mlflow-outbox.json"
# A failed MLflow request is queued and retried by the callback's outbox, so the client's own
# retries (7, about 4 minutes by default) would only stall the driver while the store is down.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset folder (default: synthetic demo data, made if absent)")
    p.add_argument("--space", default=str(REPO / "trials" / "space_demo.yaml"), help="search space YAML")
    p.add_argument("--base", default=str(REPO / "trials" / "demo.yaml"), help="base config YAML")
    p.add_argument("--num-samples", type=int, default=40, help="trials to run")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that ASHA never stops "
                                                  "(default: the base config's train.epochs)")
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA keeps 1/this per rung")
    p.add_argument("--gpus-per-trial", type=float, help="fractions share a GPU "
                                                        "(default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--max-concurrent", type=int, default=0, help="0: as many as resources allow")
    p.add_argument("--max-failures", type=int, default=0, help="retries of a failing trial from "
                                                               "its last checkpoint")
    p.add_argument("--address", help="an existing Ray cluster ('auto'); default: start Ray locally")
    p.add_argument("--storage", default=str(REPO / "runs" / "search"),
                   help="trial checkpoints: local dir, shared file system or s3://bucket/path")
    p.add_argument("--experiment", default="cellseg", help="MLflow experiment")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI "
                                          "or sqlite:///mlflow.db)")
    p.add_argument("--name", help="search name (default search-<time>); needed with --resume")
    p.add_argument("--resume", action="store_true", help="continue the search --name after a crash")
    p.add_argument("--seed", type=int, default=0, help="seeds the TPE sampler")
    p.add_argument("--time-budget", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--min-free-gb", type=float, default=2.0,
                   help="refuse to start when local storage has less free space")
    p.add_argument("--mlflow-wait", type=float, default=600,
                   help="seconds to wait at the end for an unavailable MLflow store")
    return p


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _data_root(args: argparse.Namespace) -> Path:
    """The dataset folder, checked for its layout (DataError naming it) before Ray starts."""
    if args.data:
        root = Path(args.data).resolve()
        scan_train(root)
        return root
    if not (DEMO_DATA / "train").is_dir():
        log.info("making the synthetic demo dataset in %s", DEMO_DATA)
        make_synthetic_dataset(DEMO_DATA, **DEMO_SIZE)
    return DEMO_DATA


def _storage(args: argparse.Namespace) -> tuple[str, Path]:
    """Tune's storage path, and a local folder for this search's Optuna study and MLflow outbox."""
    if "://" in args.storage:
        return args.storage, REPO / "runs" / "remote" / args.name
    storage = Path(args.storage).resolve()
    return str(storage), storage / args.name


def _parent_run(tracker: Tracker, args: argparse.Namespace, base_path: Path, space_path: Path,
                base_cfg_dict: dict) -> str:
    found = tracker.find_runs(args.experiment, f"tags.`{SEARCH_TAG}` = '{args.name}'")
    if args.resume:
        if not found:
            raise TrackingError(f"no search named {args.name!r} in experiment {args.experiment!r} "
                                f"of {tracker.uri} to resume")
        tracker.client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    if found:
        raise TrackingError(f"a search named {args.name!r} exists already; pass --resume to "
                            "continue it or choose another --name")
    params = {k: v for k, v in vars(args).items() if v is not None}
    run_id = tracker.start_run(args.experiment, args.name, params=params, tags={
        SEARCH_TAG: args.name, "cellseg.source": "search-parent", "git_commit": _git_commit(),
        "ray.cluster_resources": str(ray.cluster_resources()), "command": " ".join(sys.argv)})
    tracker.client.log_text(run_id, space_path.read_text(), f"search/{space_path.name}")
    tracker.client.log_text(run_id, yaml.safe_dump(base_cfg_dict, sort_keys=False),
                            f"search/base-{base_path.name}")
    return run_id


def run_search(args: argparse.Namespace) -> int:
    """Validate everything, then run (or resume) the search and print its summary."""
    start = time.time()
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name, the name printed when the search started")
    args.name = args.name or time.strftime("search-%Y%m%d-%H%M%S")
    if os.environ.get(FAULT_ENV):  # a drill with a typo would otherwise fail inside every trial
        try:
            parse_fault(os.environ[FAULT_ENV])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    base_path, space_path = Path(args.base).resolve(), Path(args.space).resolve()
    overrides = [f"data.root={_data_root(args)}"]
    if args.max_epochs:
        overrides.append(f"train.epochs={args.max_epochs}")
    base_cfg = load_config(base_path, overrides)
    max_epochs = base_cfg.train.epochs
    metric = base_cfg.train.metric
    space = load_space(space_path, base_cfg)
    if base_cfg.train.eval_every > 1 or "train.eval_every" in space.keys:
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # unvalidated epochs: no metric
    tracker = Tracker(args.tracking_uri)
    tracker.check()
    storage_path, optuna_dir = _storage(args)
    check_storage(storage_path, args.min_free_gb)
    optuna_dir.mkdir(parents=True, exist_ok=True)
    no_telemetry = switch_off_telemetry()  # the local Ray's processes inherit it
    ray.init(address=args.address, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": no_telemetry})  # trial workers, also on a cluster
    base_dict = config_to_dict(base_cfg)
    parent_run_id = _parent_run(tracker, args, base_path, space_path, base_dict)
    print(f"search {args.name}: MLflow parent run {parent_run_id} in {tracker.uri}")
    print(f"resume after a crash with: python search/run.py --resume --name {args.name} "
          f"{' '.join(a for a in sys.argv[1:] if a != '--resume')}")
    study_name = args.name
    optuna_storage = optuna.storages.RDBStorage(f"sqlite:///{optuna_dir / 'optuna.db'}")
    gpus = args.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    trainable = tune.with_resources(tune.with_parameters(train_trial, base=base_dict),
                                    {"cpu": args.cpus_per_trial, "gpu": gpus})
    experiment_path = f"{storage_path.rstrip('/')}/{args.name}"
    if args.resume:
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=True)
    else:
        searcher = PruningAwareOptunaSearch(
            space=space, metric=metric, mode="max", points_to_evaluate=space.baseline_points(),
            sampler=optuna.samplers.TPESampler(seed=args.seed), storage=optuna_storage,
            study_name=study_name, max_epochs=max_epochs)
        search_alg = ConcurrencyLimiter(searcher, args.max_concurrent) if args.max_concurrent else searcher
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", search_alg=search_alg, num_samples=args.num_samples,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_epochs,
                                        grace_period=args.grace_period,
                                        reduction_factor=args.reduction_factor),
                time_budget_s=args.time_budget, trial_dirname_creator=trial_dirname,
                reuse_actors=False),  # reused workers grew to 9 GB each over a 40-trial demo
            run_config=tune.RunConfig(
                name=args.name, storage_path=storage_path,
                callbacks=[MlflowTrialLogger(tracking_uri=tracker.uri, experiment=args.experiment,
                                             parent_run_id=parent_run_id, base=base_dict,
                                             max_epochs=max_epochs, metric=metric,
                                             outbox_path=optuna_dir / OUTBOX,
                                             drain_timeout_s=args.mlflow_wait)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=args.max_failures)))
    try:
        results = tuner.fit()
    except BaseException as exc:
        tracker.fail_run(parent_run_id, exc)
        raise
    if (optuna_dir / OUTBOX).is_file():
        raise TrackingError(
            f"the trials ended but MLflow at {tracker.uri} stayed unavailable; their last writes "
            f"are kept in {optuna_dir / OUTBOX}. Bring the store back, then run: python "
            f"search/run.py --resume --name {args.name} (with the same other flags)")
    summary = summarize(results, metric=metric, max_epochs=max_epochs, wall_s=time.time() - start)
    study = optuna.load_study(study_name=study_name, storage=optuna_storage)
    log_summary(tracker, parent_run_id, results, summary, study, metric=metric,
                out_dir=optuna_dir / "summary")
    tracker.end_run(parent_run_id, "FINISHED")
    print("\n".join(summary.lines(metric)))
    print(f"compare trials: mlflow ui --backend-store-uri {tracker.uri}  (then open "
          f"experiment {args.experiment!r})")
    print("write the submission: cellseg export --best --experiment "
          f"{args.experiment} --output test-results.json --zip submission.zip")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    try:
        return run_search(args)
    except (ConfigError, DataError, TrackingError, StorageError) as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
