"""Re-seeding the top, --continue and --warm-start through search/run.py, with real Ray, Optuna
and MLflow on tiny data; and the checks each makes before any trial starts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import ray

from cellseg.best_run import choose
from cellseg.errors import TrackingError
from cellseg.tracking import Tracker
from search.continuation import search_to_continue
from search.run import main as search_main
from search.run import open_parent_run
from search.study_file import JOURNAL_FILE, open_study_storage
from search.warm_start import FROM_ATTR
from searchutil import search_args, search_runs

NARROW_SPACE = """\
params:
  optim.name: {choice: [sgd, adamw]}
  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
  optim.momentum: {uniform: [0.8, 0.95], if: {optim.name: sgd}}
  model.mask_head_norm: {choice: [false, true]}
"""


def study(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(
        study_name=name, storage=open_study_storage(folder / "storage" / name / JOURNAL_FILE)
    )


@pytest.fixture(scope="module")
def searches(tmp_path_factory, easy_root, tiny_search):
    """Search s1 (2 one-epoch trials, the best re-seeded once with its split), then 1 more trial
    of it with --continue, then s2 warm-started from s1 on a narrower learning-rate range."""
    folder = tmp_path_factory.mktemp("repeats")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    narrow = dict(tiny_search, space=folder / "narrow.yaml")
    narrow["space"].write_text(NARROW_SPACE)
    common = ("--max-epochs", "1", "--seed", "3")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        first = search_main(
            search_args(
                easy_root,
                tiny_search,
                folder / "storage",
                uri,
                "rep",
                "s1",
                "--num-samples",
                "2",
                *common,
                "--reseed-top",
                "1",
                "--reseeds",
                "1",
                "--reseed-split",
            )
        )
        after_first = (*search_runs(uri, "rep", "s1"), len(study(folder, "s1").trials))
        more = search_main(
            ["--continue", "s1", "--num-samples", "1", "--tracking-uri", uri, "--experiment", "rep"]
        )
        warm = search_main(
            search_args(
                easy_root,
                narrow,
                folder / "storage",
                uri,
                "rep",
                "s2",
                "--num-samples",
                "1",
                *common,
                "--warm-start",
                "s1",
            )
        )
    finally:
        ray.shutdown()
    assert (first, more, warm) == (0, 0, 0)
    return {"folder": folder, "uri": uri, "data": easy_root, "after_first": after_first}


@pytest.mark.slow
def test_the_best_trial_is_re_seeded_as_a_trial_of_the_search_and_chosen_by_its_mean(searches):
    client, [parent], children, optuna_trials = searches["after_first"]
    assert parent.info.status == "FINISHED" and len(children) == 3
    [repeat] = [c for c in children if "cellseg.repeat_of" in c.data.tags]
    originals = {c.info.run_id: c for c in children if c is not repeat}
    repeated = originals[repeat.data.tags["cellseg.repeat_of"]]
    assert repeated.info.status == "FINISHED"
    assert repeated.data.metrics["best_segm_AP50"] == max(
        c.data.metrics["best_segm_AP50"] for c in originals.values()
    )
    assert repeat.data.tags["cellseg.repeat_of_trial"] == repeated.data.tags["ray.trial_id"]
    assert repeat.data.tags["cellseg.seed"] == repeat.data.params["train.seed"] == "1"
    assert repeat.data.tags["cellseg.split_seed"] == repeat.data.params["data.split_seed"] == "1"
    assert repeat.data.params["optim.lr"] == repeated.data.params["optim.lr"]
    assert repeat.info.status == "FINISHED" and "checkpoint" in {
        a.path for a in client.list_artifacts(repeat.info.run_id)
    }

    chosen = choose(Tracker(searches["uri"]).records("rep"), searches["data"], search="s1").ranked[0]
    assert parent.data.tags["choice.run_id"] == chosen.record.run_id
    assert chosen.configuration == repeated.info.run_id and len(chosen.seeds) == 2
    text = client.download_artifacts(parent.info.run_id, "summary/reseed_choice.txt", str(searches["folder"]))
    assert "chosen by mean over seeds" in Path(text).read_text()
    assert optuna_trials == 2  # the repeats are not Optuna trials


@pytest.mark.slow
def test_continue_adds_trials_to_the_same_study_and_parent_run(searches):
    client, [parent], children = search_runs(searches["uri"], "rep", "s1")
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert parent.data.tags["cellseg.phases"] == "s1--reseed-1,s1--continue-1"
    assert parent.data.metrics["trials"] == 3  # the summary counts every search trial, repeats apart
    trials = study(searches["folder"], "s1").trials
    assert len(trials) == 3 and trials[-1].state == optuna.trial.TrialState.COMPLETE
    assert (searches["folder"] / "storage" / "s1--continue-1").is_dir()


@pytest.mark.slow
def test_warm_start_carries_the_trials_that_fit_the_new_space(searches):
    earlier = study(searches["folder"], "s1").trials
    fits = [t for t in earlier if t.params["optim.lr"] >= 1e-4]
    trials = study(searches["folder"], "s2").trials
    carried = [t for t in trials if FROM_ATTR in t.user_attrs]
    assert [t.user_attrs[FROM_ATTR] for t in carried] == [f"s1#{t.number}" for t in fits]
    assert [t.value for t in carried] == [t.value for t in fits]
    assert len(trials) == len(carried) + 1
    _, [parent], _ = search_runs(searches["uri"], "rep", "s2")
    assert parent.data.tags["cellseg.warm_start"] == f"s1 ({len(fits)} trials)"


def test_continue_refuses_an_unknown_or_running_search_and_flags_it_has_no_use_for(
    tmp_path, mlflow_uri, capsys
):
    tracker = Tracker(mlflow_uri)
    with pytest.raises(TrackingError, match="no search named 'nope' in experiment 'rep'"):
        search_to_continue(tracker, "rep", "nope")
    open_parent_run(
        tracker,
        experiment="rep",
        name="busy",
        resume=False,
        params={},
        tags={"cellseg.source": "search-parent"},
        texts={},
    )
    with pytest.raises(TrackingError, match="still running.*--resume --name busy"):
        search_to_continue(tracker, "rep", "busy")
    code = search_main(
        ["--continue", "nope", "--num-samples", "1", "--tracking-uri", mlflow_uri, "--experiment", "rep"]
    )
    assert code == 2
    with_name = ["--continue", "busy", "--name", "other", "--tracking-uri", mlflow_uri, "--experiment", "rep"]
    assert search_main(with_name) == 2
    assert "--continue adds trials to an existing search: drop --name" in capsys.readouterr().err


def test_warm_start_from_a_search_without_a_study_file_is_a_config_error(
    tmp_path, easy_root, tiny_search, capsys
):
    args = search_args(
        easy_root,
        tiny_search,
        tmp_path / "storage",
        f"sqlite:///{tmp_path / 'x.db'}",
        "rep",
        "new",
        "--warm-start",
        "gone",
    )
    assert search_main(args) == 2
    assert "--warm-start gone: no Optuna study file" in capsys.readouterr().err
