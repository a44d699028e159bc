"""Which trials --reseed-top repeats with which seeds, and which earlier trials --warm-start
carries into a new space (plain records and a real Optuna study, no Ray)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from cellseg.config import load_config
from cellseg.errors import ConfigError
from cellseg.tracking import PARENT_TAG, REPEAT_TAG, SOURCE_TAG, RunRecord
from search.reseed import SEED_TAG, RepeatTags, check_reseed_flags, plan_repeats
from search.searcher import StudySearcher
from search.space import load_space
from search.study_file import JOURNAL_FILE, SQLITE_FILE
from search.trial_runs import TRIAL_TAG
from search.warm_start import FROM_ATTR, warm_start

TRIALS = Path(__file__).resolve().parents[1] / "trials"


def record(run_id: str, value: float, status: str = "FINISHED", **tags: str) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        name=run_id,
        status=status,
        start_time=float(len(run_id)),
        tags={SOURCE_TAG: "search", PARENT_TAG: "p", TRIAL_TAG: f"t-{run_id}", **tags},
        params={"train.metric": "segm_AP50"},
        metrics={"best_segm_AP50": value},
    )


def test_the_best_finished_trials_get_the_repeats_they_lack_with_unused_seeds():
    records = [
        record("a", 0.9, status="KILLED"),  # stopped by ASHA: never repeated
        record("b", 0.8),
        record("c", 0.7),
        record("d", 0.6),
        record("b1", 0.75, **{REPEAT_TAG: "b", SEED_TAG: "1"}),  # b was repeated once with seed 1
        record("b5", 0.1, status="FAILED", **{REPEAT_TAG: "b", SEED_TAG: "5"}),
    ]
    configs = {f"t-{r}": {"optim.lr": i} for i, r in enumerate("abcd")}
    configs["t-c"]["train.seed"] = 10
    repeats = plan_repeats(
        records, configs, top=2, reseeds=2, base_seed=0, base_split_seed=7, vary_split=True
    )
    assert [(r.run_id, r.seed, r.split_seed) for r in repeats] == [("b", 2, 9), ("c", 11, 8), ("c", 12, 9)]
    assert repeats[0].config == {"optim.lr": 1, "train.seed": 2, "data.split_seed": 9}
    assert RepeatTags(repeats)(dict(repeats[1].config)) == {
        REPEAT_TAG: "c",
        "cellseg.repeat_of_trial": "t-c",
        SEED_TAG: "11",
        "cellseg.split_seed": "8",
    }
    assert RepeatTags(repeats)({"optim.lr": 1}) == {}
    same_split = plan_repeats(
        records, configs, top=1, reseeds=1, base_seed=0, base_split_seed=7, vary_split=False
    )
    assert same_split == []  # b has its one finished repeat
    with pytest.raises(ConfigError, match="--reseeds 0"):
        check_reseed_flags(2, 0)


def test_warm_start_keeps_trials_inside_the_new_space_and_says_why_others_went(tmp_path: Path):
    base = load_config(TRIALS / "demo.yaml")
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "params:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n  optim.name: {choice: [sgd, adamw]}\n"
    )
    space = load_space(space_file, base)
    db = tmp_path / SQLITE_FILE  # a study an older search kept in SQLite
    old = optuna.create_study(study_name="old", storage=f"sqlite:///{db}", direction="maximize")
    wide = optuna.distributions.FloatDistribution(1e-6, 1.0, log=True)
    names = optuna.distributions.CategoricalDistribution(["adamw", "adam"])
    for lr, name, state, value in [
        (1e-3, "adamw", "COMPLETE", 0.5),  # fits
        (1e-5, "adamw", "COMPLETE", 0.6),  # lr outside
        (2e-3, "adam", "PRUNED", None),  # name outside
        (3e-3, "adamw", "PRUNED", None),  # fits, with its epochs
        (4e-3, "adamw", "FAIL", None),  # never carried
    ]:
        old.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState[state],
                value=value,
                params={"optim.lr": lr, "optim.name": name},
                distributions={"optim.lr": wide, "optim.name": names},
                intermediate_values={1: 0.2} if state == "PRUNED" else None,
            )
        )
    found = warm_start({"old": db}, space, "segm_AP50", 3)
    assert [t.user_attrs[FROM_ATTR] for t in found.trials] == ["old#0", "old#3"]
    assert found.trials[1].intermediate_values == {1: 0.2}
    assert found.tag() == "old (2 trials)"
    assert found.notes() == [
        "warm start from old: 2 trials carried, 2 dropped",
        "  dropped 1: optim.lr outside the new space's loguniform [0.0001, 0.01]",
        "  dropped 1: optim.name outside the new space's choice ['sgd', 'adamw']",
        "  old recorded no metric or max epochs (an older search): assumed the same",
    ]
    new = optuna.create_study(direction="maximize")
    new.add_trials(found.trials)
    trial = new.ask()  # TPE asks with the carried trials' distributions: they are compatible
    assert 1e-4 <= space(trial)["optim.lr"] <= 1e-2
    with pytest.raises(ConfigError, match="holds no study named 'other'"):
        warm_start({"other": db}, space, "segm_AP50", 3)


def test_a_warm_start_from_a_search_of_another_metric_or_epochs_is_refused(tmp_path, tiny_search, easy_root):
    base = load_config(tiny_search["base"], [f"data.root={easy_root}"])
    space = load_space(tiny_search["space"], base)
    db = tmp_path / JOURNAL_FILE
    StudySearcher(
        space,
        metric="segm_AP50",
        mode="max",
        study_file=db,
        study_name="s1",
        sampler=optuna.samplers.TPESampler(seed=0),
        max_epochs=3,
    )
    assert warm_start({"s1": db}, space, "segm_AP50", 3).notes() == [
        "warm start from s1: 0 trials carried, 0 dropped"
    ]
    for metric, epochs in [("segm_AP", 3), ("segm_AP50", 5)]:
        with pytest.raises(
            ConfigError,
            match=f"--warm-start s1: that search ranked its trials by segm_AP50 after at most 3 epochs, this one by {metric} after {epochs}",
        ):
            warm_start({"s1": db}, space, metric, epochs)


def test_trials_with_the_same_values_are_one_configuration_and_no_two_repeats_are_alike():
    records = [record("a", 0.9), record("b", 0.8), record("c", 0.7)]
    configs = {"t-a": {"optim.lr": 1}, "t-b": {"optim.lr": 1}, "t-c": {"optim.lr": 2}}  # b is a again
    repeats = plan_repeats(
        records, configs, top=2, reseeds=1, base_seed=0, base_split_seed=0, vary_split=False
    )
    assert [(r.run_id, r.seed) for r in repeats] == [("a", 1), ("c", 1)]
    seeded = {"t-a": {"optim.lr": 1, "train.seed": 0}, "t-b": {"optim.lr": 1, "train.seed": 1}}
    repeats = plan_repeats(
        records, seeded, top=2, reseeds=2, base_seed=0, base_split_seed=0, vary_split=False
    )
    assert [(r.run_id, r.seed) for r in repeats] == [("a", 1), ("a", 2), ("b", 3), ("b", 4)]
    tags = RepeatTags(repeats)
    assert [tags(dict(r.config))[SEED_TAG] for r in repeats] == ["1", "2", "3", "4"]
