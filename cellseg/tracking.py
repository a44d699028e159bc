"""The only module that talks to MLflow.

Everything goes through an explicit ``MlflowClient`` (no global active run), so one process can
keep many runs open: the search driver writes every trial's run from a single process, which is
what keeps a SQLite store free of 'database is locked' and a remote server free of races.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cellseg.checkpoint import BEST, PICTURES
from cellseg.config import Config, config_to_dict
from cellseg.data.fingerprint import DataFingerprint
from cellseg.errors import TrackingError
from cellseg.sqlite_commits import fast_commits
from cellseg.telemetry_off import switch_off_telemetry

switch_off_telemetry()  # before mlflow is imported: it decides at import whether to report usage

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

DEFAULT_DB = "mlflow.db"
DEFAULT_EXPERIMENT = "cellseg"
PARENT_TAG = "mlflow.parentRunId"
RUN_DIR_TAG = "cellseg.run_dir"
SOURCE_TAG = "cellseg.source"  # "train", "search" (a trial) or "search-parent"
SEARCH_TAG = "cellseg.search_name"  # on a search's parent run
REPEAT_TAG = "cellseg.repeat_of"  # on a re-seeded trial: the run id of the trial it repeats
DATA_TAG = "cellseg.data_fingerprint"  # the digest of cellseg.data.fingerprint
REFIT_TAG = "cellseg.refit"  # on a refit run: the id of the run whose configuration it retrained
REFIT_SEARCH_TAG = "cellseg.refit_search"  # on a refit run: its source's search, if any
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # MLflow 3.17's kind for model training
DATASET_CONTEXT = "mlflow.data.context"  # the input tag MLflow shows as a dataset's use
CHECKPOINT_ARTIFACT = "checkpoint"
CHECKPOINT_DROPPED_TAG = "cellseg.checkpoint_dropped"  # why the run's checkpoint was deleted
CONFIG_ARTIFACT = "config.yaml"
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch
_SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's where PyYAML has it (5x faster)
ERROR_CHARS = 4000  # an error tag keeps the end of the traceback, which names the error


def is_unavailable(exc: BaseException) -> bool:
    """True when an error of the store means 'try again later' (a server error, a lost
    connection, a timeout) rather than 'this request is wrong' (a 4xx answer); for a
    TrackingError, when the store's error it names as its cause does."""
    if isinstance(exc, TrackingError) and exc.__cause__ is not None:
        return is_unavailable(exc.__cause__)
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, (OSError, TimeoutError))


def error_tail(text: str) -> str:
    """The last ERROR_CHARS characters of an error text, for a tag."""
    return text[-ERROR_CHARS:]


def best_metric_key(metric: str) -> str:
    """The name under which a run logs the best value of ``metric`` (``best_<metric>``)."""
    return f"best_{metric}"


@dataclass(frozen=True)
class RunRecord:
    """What cellseg decides on about a run, as plain values."""

    run_id: str
    name: str
    status: str  # RUNNING, FINISHED, KILLED or FAILED
    start_time: float  # seconds since the epoch
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each

    @property
    def source(self) -> str:
        return self.tags.get(SOURCE_TAG, "")

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(PARENT_TAG)

    @property
    def fingerprint(self) -> str | None:
        return self.tags.get(DATA_TAG)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else a SQLite file ``mlflow.db`` in the working dir."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def _local_artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlartifacts/`` beside the database file."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts")
    return None


def _record(run: Run) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        start_time=(run.info.start_time or 0) / 1000,
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
    )


def _delete_artifacts(artifact_uri: str, path: str, tracking_uri: str) -> None:
    """Delete ``path`` (a file or folder) under a run's ``artifact_uri``. MlflowClient (3.17) has
    no call that deletes a run's artifacts; the artifact repository's ``delete_artifacts`` is the
    call ``mlflow gc`` frees a deleted run's artifacts with (docs/design.md, "what stays, and
    why"; ``tests/test_tracking.py`` fails if an upgrade breaks it)."""
    get_artifact_repository(artifact_uri, tracking_uri=tracking_uri).delete_artifacts(path)


class Tracker:
    """A thin, explicit wrapper over MlflowClient for cellseg's runs."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = resolve_tracking_uri(uri)
        fast_commits(self.uri)  # before MLflow's engine connects to a SQLite store
        self.client = MlflowClient(tracking_uri=self.uri)
        self._experiment_ids: dict[str, str] = {}  # name -> id, looked up once

    def check(self) -> None:
        """Fail fast with a clear message when the store cannot be reached."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:
            raise TrackingError(
                f"MLflow tracking store {self.uri} is not reachable: {exc}. Start the server "
                "or pass --tracking-uri / MLFLOW_TRACKING_URI pointing to a working store."
            ) from exc

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (with a local artifact root) if absent.

        The experiment is tagged as model training when it has no kind yet (MLflow 3.17's UI still
        opens it by its GenAI / Model training switch; README "Compare trials in MLflow").
        """
        if name not in self._experiment_ids:
            self._experiment_ids[name] = self._find_or_create_experiment(name)
        return self._experiment_ids[name]

    def _find_or_create_experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            return experiment.experiment_id
        try:
            return self.client.create_experiment(
                name,
                artifact_location=_local_artifact_root(self.uri),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
            )
        except MlflowException:  # created meanwhile by another process
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def start_run(
        self,
        experiment: str,
        name: str,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        dataset: DataFingerprint | None = None,
    ) -> str:
        """Create a run (nested under ``parent_run_id`` when given), log its params and its data
        (as the run's input and the tag ``cellseg.data_fingerprint``)."""
        run_tags = dict(tags or {})
        if parent_run_id:
            run_tags[PARENT_TAG] = parent_run_id
        if dataset is not None:
            run_tags[DATA_TAG] = dataset.digest
        run = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=run_tags)
        self.log_params(run.info.run_id, params or {})
        if dataset is not None:
            self._log_input(run.info.run_id, dataset)
        return run.info.run_id

    def _log_input(self, run_id: str, dataset: DataFingerprint) -> None:
        """The training data as the run's input (MLflow's Dataset column)."""
        entity = Dataset(
            name=dataset.name,
            digest=dataset.digest,
            source_type="local",
            source=json.dumps({"uri": dataset.root}),
            profile=json.dumps(dataset.profile()),
        )
        self.client.log_inputs(run_id, [DatasetInput(entity, [InputTag(DATASET_CONTEXT, "training")])])

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed training run or search)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int, tags: Mapping[str, Any] | None = None
    ) -> None:
        """Log finite numeric metrics at ``step`` (the epoch), and ``tags`` in the same write."""
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if not items and not run_tags:
            return
        for i in range(0, max(len(items), 1), _BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH], tags=run_tags if i == 0 else [])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_path: str) -> None:
        """``text`` as the artifact file ``artifact_path``."""
        self.client.log_text(run_id, text, artifact_path)

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step at which metric ``key`` was logged; 0 when never."""
        return max((step for step, _ in self.metric_history(run_id, key)), default=0)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """Every (step, value) logged for metric ``key``, by step (the epoch for cellseg's runs)."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def dataset_profile(self, run_id: str) -> dict[str, Any] | None:
        """The profile of the run's training data (``DataFingerprint.profile``); None if unrecorded."""
        for dataset_input in self.client.get_run(run_id).inputs.dataset_inputs:
            contexts = {tag.value for tag in dataset_input.tags if tag.key == DATASET_CONTEXT}
            if "training" in contexts and dataset_input.dataset.profile:
                return json.loads(dataset_input.dataset.profile)
        return None

    def set_error(self, run_id: str, error: str) -> None:
        """The tag ``error``: the end of ``error`` (a traceback names its error last)."""
        self.set_tags(run_id, {"error": error_tail(error)})

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run as FINISHED, KILLED or FAILED."""
        self.client.set_terminated(run_id, status)

    def log_config(self, run_id: str, cfg: Config) -> None:
        """The full config as ``config.yaml``: enough to rebuild and retrain the model."""
        text = yaml.dump(config_to_dict(cfg), Dumper=_SAFE_DUMPER, sort_keys=False)
        self.client.log_text(run_id, text, CONFIG_ARTIFACT)

    def finish_run(
        self, run_id: str, run_dir: Path, cfg: Config, best_metric: float, status: str = "FINISHED"
    ) -> None:
        """Log the outcome of a run directory (best metric, best.pt, pictures, config) and close."""
        self.log_outcome(run_id, run_dir, cfg, best_metric)
        self.end_run(run_id, status)

    def log_outcome(
        self, run_id: str, run_dir: Path, cfg: Config, best_metric: float, *, checkpoint: bool = True
    ) -> None:
        """The best metric, config, pictures and (unless not ``checkpoint``) ``best.pt`` of a run
        directory; again overwrites."""
        run_dir = Path(run_dir)
        if math.isfinite(best_metric):
            self.log_metrics(run_id, {best_metric_key(cfg.train.metric): best_metric}, step=0)
        self.log_config(run_id, cfg)
        if (run_dir / PICTURES).is_dir():
            self.log_artifact(run_id, run_dir / PICTURES, PICTURES)
        if checkpoint:
            self.log_checkpoint(run_id, run_dir)

    def log_checkpoint(self, run_id: str, run_dir: Path) -> None:
        """The ``best.pt`` of a run directory, when it has one."""
        if (Path(run_dir) / BEST).is_file():
            self.log_artifact(run_id, Path(run_dir) / BEST, CHECKPOINT_ARTIFACT)

    def drop_checkpoint(self, run_id: str, reason: str) -> None:
        """Delete the run's ``checkpoint/`` artifacts and tag ``reason`` (export passes it over);
        again, once deleted, only tags."""
        _delete_artifacts(self.client.get_run(run_id).info.artifact_uri, CHECKPOINT_ARTIFACT, self.uri)
        self.set_tags(run_id, {CHECKPOINT_DROPPED_TAG: reason})

    def delete_artifact_if_present(self, run_id: str, artifact: str) -> bool:
        """Delete the run's file ``artifact`` when it has one; whether it had."""
        listed = {a.path for a in self.client.list_artifacts(run_id, artifact.rpartition("/")[0] or None)}
        if artifact in listed:
            _delete_artifacts(self.client.get_run(run_id).info.artifact_uri, artifact, self.uri)
        return artifact in listed

    def fail_run(self, run_id: str, error: BaseException | str) -> None:
        """Close a run as FAILED (KILLED for an interrupt) with the error as a tag."""
        killed = isinstance(error, KeyboardInterrupt)
        self.set_error(run_id, str(error) or type(error).__name__)
        self.end_run(run_id, "KILLED" if killed else "FAILED")

    def record(self, run_id: str) -> RunRecord:
        """The run ``run_id``; TrackingError naming it when the store has no such run (or is
        unavailable)."""
        try:
            return _record(self.client.get_run(run_id))
        except MlflowException as exc:
            problem = "is unavailable" if is_unavailable(exc) else "has no such run"
            raise TrackingError(f"reading run {run_id}: MLflow at {self.uri} {problem}: {exc}") from exc

    def records(self, experiment: str, filter_string: str = "") -> list[RunRecord]:
        """The runs of ``experiment`` matching MLflow's ``filter_string`` (all pages), oldest
        first; empty when the experiment does not exist."""
        experiment_obj = self.client.get_experiment_by_name(experiment)
        if experiment_obj is None:
            return []
        records, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_obj.experiment_id],
                filter_string,
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            records += [_record(run) for run in page]
            token = page.token
            if not token:
                return records

    def tagged(self, experiment: str, tag: str, value: str) -> list[RunRecord]:
        """The runs of ``experiment`` whose tag ``tag`` is ``value``, oldest first."""
        return self.records(experiment, f"tags.`{tag}` = '{value}'")

    def experiment_name(self, run_id: str) -> str:
        """The name of the experiment that holds run ``run_id``."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        return self.client.get_experiment(experiment_id).name

    def download_checkpoint(self, run_id: str, dst: str | Path) -> Path:
        """The run's ``checkpoint/best.pt``, downloaded into ``dst``; TrackingError if it has none."""
        return self.download_artifact(run_id, f"{CHECKPOINT_ARTIFACT}/{BEST}", dst)

    def download_artifact(self, run_id: str, artifact: str, dst: str | Path) -> Path:
        """The run's file ``artifact``, downloaded into ``dst``; TrackingError if it has none."""
        found = self.download_if_present(run_id, artifact, dst)
        if found is None:
            raise TrackingError(f"run {run_id} has no {artifact} artifact in {self.uri}")
        return found

    def download_if_present(self, run_id: str, artifact: str, dst: str | Path) -> Path | None:
        """The run's file ``artifact`` downloaded into ``dst``; None when it has none."""
        try:
            listed = {a.path for a in self.client.list_artifacts(run_id, artifact.rpartition("/")[0] or None)}
            return self.download(run_id, artifact, dst) if artifact in listed else None
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"run {run_id}: cannot download its {artifact}: {exc}") from exc

    def download(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))
