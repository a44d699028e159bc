"""StudySearcher driven the way Tune drives it, on a real Optuna study (no Ray run): in a journal
file, as a search keeps it, and in an older search's SQLite file."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher

from cellseg.config import ConfigError, load_config
from search.searcher import TRIAL_ATTR, StudySearcher
from search.space import load_space
from search.study_file import JOURNAL_FILE, SQLITE_FILE, open_study_storage

TRIALS = Path(__file__).resolve().parents[1] / "trials"
MAX_EPOCHS = 3
METRIC = "segm_AP50"


@pytest.fixture
def space():
    return load_space(TRIALS / "space_demo.yaml", load_config(TRIALS / "demo.yaml"))


@pytest.fixture(params=[JOURNAL_FILE, SQLITE_FILE])
def storage(tmp_path, request) -> Path:
    """The study file."""
    return tmp_path / request.param


def make(space, storage, **kwargs) -> StudySearcher:
    return StudySearcher(
        space,
        metric=METRIC,
        mode="max",
        study_file=storage,
        study_name="s1",
        sampler=optuna.samplers.TPESampler(seed=0),
        max_epochs=MAX_EPOCHS,
        **kwargs,
    )


def result(epoch: int, value: float | None = None) -> dict:
    """A flattened Tune result; ``value`` None is an epoch without validation."""
    found = {"training_iteration": epoch, "epoch": epoch, "train_loss": 1.0 / epoch}
    return found if value is None else {**found, METRIC: value}


def by_tune_id(storage: Path) -> dict[str, optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name="s1", storage=open_study_storage(storage)).trials
    found = {t.user_attrs[TRIAL_ATTR]: t for t in trials}
    assert len(found) == len(trials), "a Tune trial has two Optuna trials"
    return found


def test_baselines_come_first_then_the_sampler_in_the_space(space, storage):
    searcher = make(space, storage, points_to_evaluate=space.baseline_points())
    first, second, third = (searcher.suggest(f"t{i}") for i in range(3))
    assert first["optim.name"] == "sgd" and first["optim.momentum"] == 0.9
    assert second["optim.name"] == "adam" and "optim.momentum" not in second
    assert isinstance(first["model.aspect_ratios"], list)  # decoded from Optuna's JSON string
    assert set(third) <= set(space.keys) and "optim.lr" in third
    assert set(by_tune_id(storage)) == {"t0", "t1", "t2"}


def test_each_ending_is_told_with_its_state_value_and_validated_epochs(space, storage):
    searcher = make(space, storage)
    for trial_id in ("done", "stopped", "errored", "sparse", "never", "nan"):
        searcher.suggest(trial_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "step already reported" warning from Optuna
        for epoch, value in ((1, 0.1), (2, 0.2), (3, 0.3)):
            searcher.on_trial_result("done", result(epoch, value))
        searcher.on_trial_complete("done", result(3, 0.3))  # Tune repeats the last result
        searcher.on_trial_result("stopped", result(1, 0.05))
        searcher.on_trial_complete("stopped", result(2, 0.07))  # ASHA's stop: only here
        searcher.on_trial_result("errored", result(1, 0.1))
        searcher.on_trial_complete("errored", error=True)
        for epoch, value in ((1, None), (2, 0.2), (3, None)):  # train.eval_every: 2
            searcher.on_trial_result("sparse", result(epoch, value))
        searcher.on_trial_complete("sparse", result(3, None))
        searcher.on_trial_complete("never")  # removed while pending
        searcher.on_trial_complete("nan", result(3, float("nan")))
    told = by_tune_id(storage)
    assert told["done"].state == TrialState.COMPLETE and told["done"].value == 0.3
    assert told["done"].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}
    assert told["stopped"].state == TrialState.PRUNED
    assert told["stopped"].intermediate_values == {1: 0.05, 2: 0.07}
    assert told["errored"].state == TrialState.FAIL
    assert told["errored"].intermediate_values == {1: 0.1}
    assert told["sparse"].intermediate_values == {2: 0.2}
    assert told["never"].state == TrialState.FAIL and told["nan"].state == TrialState.FAIL
    searcher.on_trial_result("done", result(4, 0.4))  # late news of a told trial is ignored
    searcher.on_trial_complete("done", result(4, 0.4))
    assert by_tune_id(storage)["done"].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}


def test_restore_continues_the_study_without_doubling_or_losing_a_trial(space, storage, tmp_path):
    searcher = make(space, storage)
    as_started = pickle.dumps(searcher)  # what Tuner.restore unpickles before restore()
    configs = {t: searcher.suggest(t) for t in ("a", "b", "c")}
    searcher.on_trial_result("a", result(1, 0.1))
    searcher.on_trial_complete("a", result(2, 0.2))
    searcher.on_trial_result("b", result(1, 0.3))
    searcher.on_trial_result("c", result(1, 0.4))
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.on_trial_result("b", result(2, 0.5))  # after the last save, then the driver dies:
    searcher.on_trial_complete("b", result(3, 0.6))  # b was told; Tune will rerun its last epochs
    orphan = searcher.suggest("d")  # Optuna started d; Tune's saved state never heard of it

    restored = pickle.loads(as_started)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("b", result(3, 0.6))
    restored.on_trial_complete("b", result(3, 0.6))
    restored.on_trial_result("c", result(1, 0.4))  # c resumed from its checkpoint at epoch 1
    restored.on_trial_result("c", result(2, 0.45))
    restored.on_trial_complete("c", result(3, 0.5))
    assert restored.suggest("e") == orphan, "the orphan's parameters were not queued again"

    told = optuna.load_study(study_name="s1", storage=open_study_storage(storage)).trials
    assert [t.user_attrs[TRIAL_ATTR] for t in told] == ["a", "b", "c", "d", "e"]
    state = {t.user_attrs[TRIAL_ATTR]: t for t in told}
    assert state["a"].state == TrialState.PRUNED
    assert state["b"].state == TrialState.COMPLETE and state["b"].value == 0.6
    assert state["c"].state == TrialState.COMPLETE
    assert state["c"].intermediate_values == {1: 0.4, 2: 0.45, 3: 0.5}
    assert state["d"].state == TrialState.FAIL and state["e"].state == TrialState.RUNNING
    assert state["c"].params == {
        k: space.params[space.keys.index(k)].encode(v) for k, v in configs["c"].items()
    }


def test_an_errored_trial_that_resume_runs_again_gets_a_second_record(space, storage, tmp_path):
    searcher = make(space, storage)
    as_started = pickle.dumps(searcher)
    searcher.suggest("x")
    searcher.suggest("y")
    searcher.on_trial_result("x", result(1, 0.1))
    searcher.on_trial_complete("x", error=True)
    searcher.on_trial_result("y", result(1, 0.2))
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.on_trial_complete("y", error=True)  # after the last save
    restored = pickle.loads(as_started)
    restored.restore(str(tmp_path / "searcher.pkl"))
    for trial_id, value in (("x", 0.3), ("y", 0.4)):  # Tune's resume_errored: from epoch 2 on
        restored.on_trial_result(trial_id, result(2, value))
        restored.on_trial_complete(trial_id, result(3, value + 0.1))

    trials = optuna.load_study(study_name="s1", storage=open_study_storage(storage)).trials
    assert [(t.user_attrs[TRIAL_ATTR], t.state) for t in trials] == [
        ("x", TrialState.FAIL),
        ("y", TrialState.FAIL),
        ("x", TrialState.COMPLETE),
        ("y", TrialState.COMPLETE),
    ]
    again_x, again_y = trials[2:]
    assert again_x.params == trials[0].params and again_x.value == pytest.approx(0.4)
    assert again_x.intermediate_values == pytest.approx({1: 0.1, 2: 0.3, 3: 0.4})
    assert again_y.intermediate_values == pytest.approx({1: 0.2, 2: 0.4, 3: 0.5})


def test_restored_sampler_continues_its_random_sequence(space, storage, tmp_path):
    searcher = make(space, storage)
    as_started = pickle.dumps(searcher)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = pickle.loads(as_started)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("c") == searcher.suggest("b")


def test_concurrency_limiter_holds_suggestions_until_a_trial_ends(space, storage):
    limited = ConcurrencyLimiter(make(space, storage), max_concurrent=1)
    assert limited.suggest("a") and limited.suggest("b") is None
    limited.on_trial_complete("a", result(3, 0.3))
    assert limited.suggest("c") not in (None, Searcher.FINISHED)
    assert set(by_tune_id(storage)) == {"a", "c"}


def test_a_second_study_with_the_same_name_is_refused(space, storage):
    make(space, storage)
    with pytest.raises(ConfigError, match="exists already"):
        make(space, storage)
