"""The only module that talks to MLflow.

Everything goes through an explicit ``MlflowClient`` (no global active run), so one process can
keep many runs open: the search driver writes every trial's run from a single process, which is
what keeps a SQLite store free of 'database is locked' and a remote server free of races.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from cellseg.checkpoint import BEST, PICTURES
from cellseg.config import Config, config_to_dict
from cellseg.telemetry_off import switch_off_telemetry

switch_off_telemetry()  # before mlflow is imported: it decides at import whether to report usage

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

DEFAULT_DB = "mlflow.db"
DEFAULT_EXPERIMENT = "cellseg"
BEST_METRIC = "best_segm_AP50"
PARENT_TAG = "mlflow.parentRunId"
RUN_DIR_TAG = "cellseg.run_dir"
CHECKPOINT_ARTIFACT = "checkpoint"
CONFIG_ARTIFACT = "config.yaml"
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch


class TrackingError(RuntimeError):
    """MLflow cannot be used: unreachable server, unwritable store, no matching run."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else a SQLite file ``mlflow.db`` in the working dir."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def _local_artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlartifacts/`` beside the database file."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")
    return None


class Tracker:
    """A thin, explicit wrapper over MlflowClient for cellseg's runs."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    def check(self) -> None:
        """Fail fast with a clear message when the store cannot be reached."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:
            raise TrackingError(
                f"MLflow tracking store {self.uri} is not reachable: {exc}. Start the server "
                "or pass --tracking-uri / MLFLOW_TRACKING_URI pointing to a working store.") from exc

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (with a local artifact root) if absent."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_local_artifact_root(self.uri))
        except MlflowException:  # created meanwhile by another process
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def start_run(self, experiment: str, name: str, *, params: Mapping[str, Any] = {},
                  tags: Mapping[str, str] = {}, parent_run_id: str | None = None) -> str:
        """Create a run (nested under ``parent_run_id`` when given) and log its params."""
        run_tags = dict(tags)
        if parent_run_id:
            run_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=run_tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i:i + _BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log finite numeric metrics at ``step`` (the epoch)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + _BATCH])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run as FINISHED, KILLED or FAILED."""
        self.client.set_terminated(run_id, status)

    def log_config(self, run_id: str, cfg: Config) -> None:
        """The full config as ``config.yaml``: enough to rebuild and retrain the model."""
        self.client.log_text(run_id, yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
                             CONFIG_ARTIFACT)

    def finish_run(self, run_id: str, run_dir: Path, cfg: Config, best_metric: float,
                   status: str = "FINISHED") -> None:
        """Log the outcome of a run directory (best metric, best.pt, pictures, config) and close."""
        run_dir = Path(run_dir)
        if math.isfinite(best_metric):
            self.log_metrics(run_id, {BEST_METRIC: best_metric}, step=0)
        self.log_config(run_id, cfg)
        if (run_dir / BEST).is_file():
            self.log_artifact(run_id, run_dir / BEST, CHECKPOINT_ARTIFACT)
        if (run_dir / PICTURES).is_dir():
            self.log_artifact(run_id, run_dir / PICTURES, PICTURES)
        self.end_run(run_id, status)

    def fail_run(self, run_id: str, error: BaseException | str) -> None:
        """Close a run as FAILED (KILLED for an interrupt) with the error as a tag."""
        killed = isinstance(error, KeyboardInterrupt)
        self.set_tags(run_id, {"error": str(error)[:4000] or type(error).__name__})
        self.end_run(run_id, "KILLED" if killed else "FAILED")

    def find_runs(self, experiment: str, filter_string: str = "", order_by: list[str] | None = None,
                  max_results: int = 1000) -> list:
        experiment_obj = self.client.get_experiment_by_name(experiment)
        if experiment_obj is None:
            return []
        return self.client.search_runs([experiment_obj.experiment_id], filter_string,
                                       order_by=order_by, max_results=max_results)

    def best_run(self, experiment: str = DEFAULT_EXPERIMENT):
        """The run of ``experiment`` with the highest ``best_segm_AP50`` that has a checkpoint."""
        runs = self.find_runs(experiment, f"metrics.{BEST_METRIC} >= 0",
                              order_by=[f"metrics.{BEST_METRIC} DESC"])
        if not runs:
            raise TrackingError(
                f"no run with metric {BEST_METRIC} in experiment {experiment!r} of {self.uri}; "
                "train or search first, or pass --experiment / --tracking-uri")
        return runs[0]

    def download(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

