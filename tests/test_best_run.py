"""Which run ``export --best`` ships (cellseg.best_run and commands.best_checkpoints), and which
checkpoints a search's --keep-top keeps, on a real MLflow SQLite store filled with runs shaped as
``cellseg train`` and searches write them."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cellseg.best_run import candidate, choose, export_order, first_kept, groups, has_checkpoint
from cellseg.commands import best_checkpoints
from cellseg.config import DataConfig
from cellseg.data import dataset_fingerprint
from cellseg.tracking import Tracker, TrackingError
from search.reseed import seeded_choice
from search.summary import SearchSummary, as_exported
from search.trial_runs import drop_beyond_top

EXPERIMENT = "cellseg"
T0 = 1_780_000_000_000  # ms; every run gets an explicit, increasing start time
_clock = itertools.count()


def dataset(root: Path) -> Path:
    """A dataset folder with placeholder files: fingerprints never decode images."""
    for item in ("a", "b"):
        (root / "train" / item).mkdir(parents=True)
        (root / "train" / item / "image.tif").write_bytes(root.name.encode() * 10)
    (root / "test_image_name_to_ids.json").write_text("[]")
    return root


class Store:
    """Runs written with MlflowClient the way cellseg's Tracker writes them."""

    def __init__(self, tmp_path: Path, uri: str) -> None:
        self.tmp = tmp_path
        self.tracker = Tracker(uri)
        self.client = MlflowClient(self.tracker.uri)
        self.experiment_id = self.tracker.experiment_id(EXPERIMENT)

    def run(
        self,
        name: str,
        *,
        source: str,
        data: Path | None = None,
        value: float | None = None,
        status: str = "FINISHED",
        parent: str | None = None,
        search: str | None = None,
        metric: str = "segm_AP50",
        split: dict | None = None,
        start: int | None = None,
        checkpoint: bool = True,
        record_data: bool = True,
        tags: dict[str, str] | None = None,
    ) -> str:
        start = T0 + 1000 * next(_clock) if start is None else start
        tags = {"cellseg.source": source, **(tags or {})}
        params = {"train.metric": metric, **{f"data.{k}": v for k, v in (split or {}).items()}}
        if parent:
            tags["mlflow.parentRunId"] = parent
        if search:
            tags["cellseg.search_name"] = search
        if data is not None:
            params["data.root"] = str(data)
            if record_data:
                tags["cellseg.data_fingerprint"] = dataset_fingerprint(
                    DataConfig(root=str(data), **(split or {}))
                ).digest
        run_id = self.client.create_run(
            self.experiment_id, start_time=start, run_name=name, tags=tags
        ).info.run_id
        self.client.log_batch(
            run_id, params=[Param(k, str(v)) for k, v in params.items()], tags=[RunTag("x", "y")]
        )
        if value is not None:
            self.client.log_batch(run_id, metrics=[Metric(f"best_{metric}", value, start, 0)])
        if checkpoint and source != "search-parent":
            best = self.tmp / "best.pt"
            best.write_text(f"weights of {name}")
            self.client.log_artifact(run_id, str(best), "checkpoint")
        if status != "RUNNING":
            self.client.set_terminated(run_id, status)
        return run_id

    def search(
        self, name: str, data: Path, trials: dict[str, tuple[float | None, str]], **kwargs
    ) -> dict[str, str]:
        """A parent (scoring above every trial) and its trials {name: (value, status)}."""
        parent = self.run(name, source="search-parent", data=data, value=9.0, search=name)
        ids = {name: parent}
        for trial, (value, status) in trials.items():
            ids[trial] = self.run(
                trial, source="search", data=data, value=value, status=status, parent=parent, **kwargs
            )
        return ids

    def choose(self, data: Path, search: str | None = None):
        return choose(self.tracker.records(EXPERIMENT), data, search=search)


@pytest.fixture
def store(tmp_path: Path, mlflow_uri: str) -> Store:
    return Store(tmp_path, mlflow_uri)


@pytest.fixture
def real(tmp_path: Path) -> Path:
    return dataset(tmp_path / "real")


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    return dataset(tmp_path / "demo-data")


def test_never_a_parent_a_failed_or_a_running_run(store: Store, real: Path) -> None:
    ids = store.search(
        "s",
        real,
        {
            "failed": (0.9, "FAILED"),
            "running": (0.8, "RUNNING"),
            "stopped": (0.5, "KILLED"),
            "finished": (0.4, "FINISHED"),
            "no-metric": (None, "FINISHED"),
        },
    )
    choice = store.choose(real)
    assert choice.search == "s" and choice.group.kind == "search"
    assert [c.record.run_id for c in choice.ranked] == [ids["stopped"], ids["finished"]]
    assert choice.ranked[0].value == 0.5 and choice.data.digest == choice.ranked[0].record.fingerprint


def test_a_newer_demo_search_on_other_data_is_not_chosen(store: Store, real: Path, demo: Path) -> None:
    real_ids = store.search("real-search", real, {"r1": (0.3, "FINISHED"), "r2": (0.4, "KILLED")})
    demo_ids = store.search("demo-search", demo, {"d1": (1.0, "FINISHED")})
    assert store.choose(real).ranked[0].record.run_id == real_ids["r2"]
    assert store.choose(demo).ranked[0].record.run_id == demo_ids["d1"]
    assert [g.name for g in groups(store.tracker.records(EXPERIMENT))] == ["demo-search", "real-search"]


def test_the_most_recent_matching_search_unless_one_is_named(store: Store, real: Path) -> None:
    old = store.search("old", real, {"o1": (0.9, "FINISHED")})
    new = store.search("new", real, {"n1": (0.2, "FINISHED")})
    single = store.run("single", source="train", data=real, value=0.5)
    assert store.choose(real).ranked[0].record.run_id == single  # a training run is a group too
    assert store.choose(real, search="new").ranked[0].record.run_id == new["n1"]
    choice = store.choose(real, search="old")
    assert choice.ranked[0].record.run_id == old["o1"] and choice.search == "old"
    assert store.choose(real, search="single").search is None


def test_nothing_matching_lists_the_candidates_with_data_and_dates(
    store: Store, real: Path, demo: Path
) -> None:
    store.search("demo-search", demo, {"d1": (1.0, "FINISHED"), "d2": (0.5, "KILLED")})
    store.run("legacy", source="train", data=real, value=0.7, record_data=False)
    with pytest.raises(TrackingError) as raised:
        store.choose(real)
    message = str(raised.value)
    assert str(real) in message and "2 training images" in message
    digest = dataset_fingerprint(DataConfig(root=str(demo))).digest
    assert f"search 'demo-search': 2 exportable run(s), data demo-data@{digest}, started 20" in message
    assert "train 'legacy': 1 exportable run(s), data real (unrecorded), started 20" in message
    assert "--run-id" in message
    with pytest.raises(TrackingError, match="named 'demo-search'"):  # a named search on other data
        store.choose(real, search="demo-search")
    with pytest.raises(TrackingError, match="named 'nope'"):
        store.choose(demo, search="nope")


def test_ties_go_to_the_earlier_run_then_the_smaller_id(store: Store, real: Path) -> None:
    parent = store.run("s", source="search-parent", data=real, search="s")
    late = store.run("late", source="search", data=real, value=0.5, parent=parent, start=T0 + 5)
    early = store.run("early", source="search", data=real, value=0.5, parent=parent, start=T0 + 1)
    same = [
        store.run(f"same{i}", source="search", data=real, value=0.5, parent=parent, start=T0 + 3)
        for i in range(2)
    ]
    ranked = [c.record.run_id for c in store.choose(real).ranked]
    assert ranked == [early, *sorted(same), late]


def test_each_run_is_matched_under_its_own_split_and_metric(store: Store, real: Path) -> None:
    ids = store.search("s", real, {"t": (0.3, "FINISHED")}, split={"val_fraction": 0.25}, metric="bbox_AP50")
    choice = store.choose(real)
    assert choice.ranked[0].record.run_id == ids["t"] and choice.ranked[0].metric == "bbox_AP50"
    assert choice.data.val_fraction == 0.25
    assert choice.data.digest != dataset_fingerprint(DataConfig(root=str(real))).digest


def test_a_missing_checkpoint_is_skipped_with_a_warning(
    store: Store, real: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parent = store.run("s", source="search-parent", data=real, search="s")
    gone = store.run("gone", source="search", data=real, value=0.9, parent=parent, checkpoint=False)
    kept = store.run("kept", source="search", data=real, value=0.8, parent=parent)
    with caplog.at_level(logging.WARNING):
        [(run_id, checkpoint, provenance)] = best_checkpoints(
            store.tracker, EXPERIMENT, None, str(real), tmp_path / "scratch"
        )
    assert run_id == kept and checkpoint.read_text() == "weights of kept"
    assert provenance["skipped_runs"] == [gone] and provenance["run_name"] == "kept"
    assert provenance["search"] == "s" and provenance["metric_value"] == 0.8
    assert any(gone in r.getMessage() and "gone" in r.getMessage() for r in caplog.records)

    store.client.set_terminated(kept, "FAILED")
    with pytest.raises(TrackingError, match=f"search 's'.*skipped: {gone}"):
        best_checkpoints(store.tracker, EXPERIMENT, None, str(real), tmp_path / "scratch")


def test_an_ensemble_takes_the_k_best_runs_with_checkpoints(store: Store, real: Path, tmp_path: Path) -> None:
    parent = store.run("s", source="search-parent", data=real, search="s")
    runs = {
        name: store.run(
            name, source="search", data=real, value=value, parent=parent, checkpoint=name != "gone"
        )
        for name, value in (("third", 0.5), ("gone", 0.9), ("best", 0.8), ("second", 0.7), ("fourth", 0.4))
    }
    found = best_checkpoints(store.tracker, EXPERIMENT, None, str(real), tmp_path / "a", 3)
    assert [run_id for run_id, _, _ in found] == [runs["best"], runs["second"], runs["third"]]
    assert [c.read_text() for _, c, _ in found] == [
        "weights of best",
        "weights of second",
        "weights of third",
    ]  # one file each
    assert found[0][2]["skipped_runs"] == [runs["gone"]]
    assert [p["metric_value"] for _, _, p in found] == [0.8, 0.7, 0.5]
    with pytest.raises(TrackingError, match=r"--ensemble 5 needs 5 runs.*search 's' has 4 \(of 5"):
        best_checkpoints(store.tracker, EXPERIMENT, None, str(real), tmp_path / "b", 5)


def test_re_seeded_configurations_rank_by_their_mean_and_export_their_best_seed(
    store: Store, real: Path, tmp_path: Path
) -> None:
    parent = store.run("s", source="search-parent", data=real, search="s")

    def trial(name: str, value: float, repeats: str | None = None, **kwargs) -> str:
        tags = {"cellseg.repeat_of": repeats} if repeats else None
        return store.run(name, source="search", data=real, value=value, parent=parent, tags=tags, **kwargs)

    lucky = trial("lucky", 0.95)  # the best single run, never re-seeded
    noisy = trial("noisy", 0.90)  # re-seeded: mean 0.80
    noisy_again = [trial("noisy-1", 0.70, noisy), trial("noisy-2", 0.80, noisy)]
    steady = trial("steady", 0.84)  # re-seeded: mean 0.85, its second seed the best of them
    steady_again = [trial("steady-1", 0.86, steady), trial("steady-2", 0.85, steady)]
    trial("steady-3", 0.99, steady, status="FAILED")  # a failed repeat counts for nothing

    ranked = store.choose(real).ranked
    assert [c.record.run_id for c in ranked] == [
        steady_again[0],
        steady_again[1],
        steady,
        noisy,
        noisy_again[1],
        noisy_again[0],
        lucky,
    ]
    assert ranked[0].mean == pytest.approx(0.85) and sorted(ranked[0].seeds) == [0.84, 0.85, 0.86]
    assert ranked[-1].seeds == () and ranked[-1].mean == 0.95

    [(run_id, _, provenance)] = best_checkpoints(store.tracker, EXPERIMENT, None, str(real), tmp_path / "x")
    assert run_id == steady_again[0] and provenance["metric_value"] == 0.86
    assert provenance["configuration_run_id"] == steady
    assert provenance["configuration_mean"] == pytest.approx(0.85)
    assert provenance["chosen_by"] == "mean best segm_AP50 over the 3 seeds of its configuration"


def test_a_run_whose_checkpoint_the_search_dropped_is_passed_over_quietly(
    store: Store, real: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tracker.drop_checkpoint (a search's --keep-top) deletes the artifact and tags the run:
    export --best takes the next run without a warning, the dropped run still counts in its
    configuration's mean, and an ensemble counts only runs with checkpoints."""
    parent = store.run("s", source="search-parent", data=real, search="s")
    steady = store.run("steady", source="search", data=real, value=0.8, parent=parent)
    dropped = store.run(
        "steady-1", source="search", data=real, value=0.9, parent=parent, tags={"cellseg.repeat_of": steady}
    )
    store.run("lucky", source="search", data=real, value=0.95, parent=parent)  # never re-seeded
    store.tracker.drop_checkpoint(dropped, "not among the 1 best trials by segm_AP50")
    assert not store.client.list_artifacts(dropped, "checkpoint")
    record = store.tracker.record(dropped)
    assert record.tags["cellseg.checkpoint_dropped"] == "not among the 1 best trials by segm_AP50"
    assert record.metrics["best_segm_AP50"] == 0.9 and record.params["train.metric"] == "segm_AP50"
    with caplog.at_level(logging.WARNING):
        [(run_id, checkpoint, provenance)] = best_checkpoints(
            store.tracker, EXPERIMENT, None, str(real), tmp_path / "scratch"
        )
    assert run_id == steady and checkpoint.read_text() == "weights of steady"
    assert provenance["configuration_mean"] == pytest.approx(0.85)  # the dropped seed counts
    assert provenance["skipped_runs"] == [] and not caplog.records
    with pytest.raises(TrackingError, match=r"--ensemble 3 needs 3 runs.*has 2 \(of 3.*--keep-top"):
        best_checkpoints(store.tracker, EXPERIMENT, None, str(real), tmp_path / "b", 3)


def test_keep_top_with_re_seeding_keeps_the_run_that_export_refit_and_the_summary_name(
    store: Store, real: Path, tmp_path: Path
) -> None:
    """--keep-top 1 with --reseed-top: the search drops checkpoints as its trials end, the re-seed
    step drops none, then the driver drops once by the final means. The best seed of the best
    configuration lost its checkpoint during the search, so the next run of that configuration is
    the one the re-seeded choice, export --best, refit --best and the summary all name."""
    parent = store.run("s", source="search-parent", data=real, search="s")

    def trial(name: str, value: float, repeats: str | None = None) -> str:
        tags = {
            "cellseg.searched_keys": "train.metric",
            **({"cellseg.repeat_of": repeats} if repeats else {}),
        }
        return store.run(name, source="search", data=real, value=value, parent=parent, tags=tags)

    def ended() -> list:
        return [c for c in map(candidate, store.tracker.records(EXPERIMENT)) if c is not None]

    for name, value in (("lucky", 0.90), ("steady", 0.80), ("poor", 0.50)):  # the search's trials
        trial(name, value)
        drop_beyond_top(store.tracker, ended(), 1)  # as the search's callback does at each end
    ids = {r.name: r.run_id for r in store.tracker.records(EXPERIMENT)}
    dropped = {r.name for r in store.tracker.records(EXPERIMENT) if not has_checkpoint(r)}
    assert dropped == {"steady", "poor"}
    for name, value, of in (("lucky-1", 0.60, "lucky"), ("steady-1", 0.78, "steady")):
        ids[name] = trial(name, value, ids[of])  # the re-seed step: keep_top 0, nothing dropped
    for name, value, of in (("lucky-2", 0.60, "lucky"), ("steady-2", 0.77, "steady")):
        ids[name] = trial(name, value, ids[of])
    drop_beyond_top(store.tracker, ended(), 1)  # once, after the re-seed step
    records = store.tracker.records(EXPERIMENT)
    assert {r.name for r in records if has_checkpoint(r) and r.parent_id} == {"steady-1"}
    reason = store.tracker.record(ids["lucky"]).tags["cellseg.checkpoint_dropped"]
    assert reason.startswith("not among the 1 best trials in export --best's order: re-seeded configurations")
    assert "mean best segm_AP50 over seeds" in reason

    choice = seeded_choice([r for r in records if r.parent_id == parent])
    assert choice is not None and choice.configurations[0][0].record.name == "steady"  # best seed, dropped
    assert choice.chosen.record.run_id == ids["steady-1"]
    assert choice.tags()["choice.run_id"] == ids["steady-1"] and ids["steady-1"] in choice.lines()[-1]
    assert store.choose(real).chosen.record.run_id == ids["steady-1"]  # what refit --best retrains
    [(run_id, _, _)] = best_checkpoints(store.tracker, EXPERIMENT, None, str(real), tmp_path / "x")
    assert run_id == ids["steady-1"]
    summary = as_exported(
        SearchSummary(3, 0, "trial_lucky", "t1", 0.9, {}, "runs:/x/checkpoint/best.pt", 3, 3, 1.0),
        first_kept(export_order(ended())),
    )
    assert summary.best_checkpoint == f"runs:/{ids['steady-1']}/checkpoint/best.pt"
    assert (summary.best_trial, summary.best_metric) == ("steady-1", 0.78)
    assert summary.best_config == {"train.metric": "segm_AP50"}
    assert summary.lines("segm_AP50")[1] == (
        "chosen run: steady-1  segm_AP50 0.7800 (by mean best segm_AP50 over seeds; export --best takes it)"
    )
