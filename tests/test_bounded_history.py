"""TPE over a bounded history (search/bounded_history.py): exactly TPE below the bound, TPE over
the best, recent and running trials past it, kept up to date without looking again at finished
trials, and pickled with the searcher's study."""

from __future__ import annotations

import pickle

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from search.bounded_history import BoundedHistory, BoundedHistorySampler

X = FloatDistribution(0.0, 1.0)
OPT = CategoricalDistribution(["sgd", "adam"])


@pytest.fixture(autouse=True)
def quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


def ask_and_tell(study: optuna.Study, count: int) -> list[dict]:
    """``count`` trials of a space with a conditional parameter, every third pruned after two
    epochs (as ASHA stops trials); the parameters asked, in order."""
    asked = []
    for _ in range(count):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        opt = trial.suggest_categorical("opt", ["sgd", "adam"])
        momentum = trial.suggest_float("momentum", 0.8, 0.99) if opt == "sgd" else 0.0
        value = 1.0 - (x - 0.3) ** 2 + 0.1 * momentum
        asked.append(trial.params)
        if trial.number % 3 == 2:
            trial.report(value / 2, 1)
            trial.report(value / 1.5, 2)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
    return asked


def finished(value: float | None = None, *, pruned_at: dict[int, float] | None = None, x: float = 0.5):
    if pruned_at is not None:
        return create_trial(
            state=TrialState.PRUNED, params={"x": x}, distributions={"x": X}, intermediate_values=pruned_at
        )
    return create_trial(value=value, params={"x": x}, distributions={"x": X})


def test_below_its_bound_the_sampler_is_tpe():
    plain = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=3))
    bounded = optuna.create_study(
        direction="maximize",
        sampler=BoundedHistorySampler(optuna.samplers.TPESampler(seed=3), recent=30, best=5),
    )
    assert ask_and_tell(bounded, 40) == ask_and_tell(plain, 40)


def test_history_keeps_the_best_the_recent_others_and_the_running():
    study = optuna.create_study(direction="maximize")
    study.add_trials([finished(v) for v in (0.9, 0.1, 0.2, 0.95, 0.3, 0.4)])  # 0-5
    study.add_trials(
        [
            finished(pruned_at={1: 0.1, 3: 0.5}),  # 6: reached epoch 3
            finished(pruned_at={1: 0.8}),  # 7: epoch 1 only, however good
            finished(pruned_at={1: 0.2, 3: 0.6}),  # 8: epoch 3, better than 6
            create_trial(state=TrialState.FAIL),  # 9: never shown
        ]
    )
    running = study.ask()  # 10
    study.add_trials([finished(0.05), finished(0.06)])  # 11, 12
    history = BoundedHistory(recent=3, best=2)
    numbers = [t.number for t in history(study.get_trials(deepcopy=False), study.direction)]
    # best completed 3 and 0, best pruned 8 and 6; the three others last to finish 12, 11, 7
    # (8 is kept as a best, 9 failed); the running 10
    assert numbers == [0, 3, 6, 7, 8, 10, 11, 12]
    assert history.unfinished == {10}

    study.tell(running, 0.99)  # now the best, and the last to finish
    study.add_trials([finished(0.07)])  # 13
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in history(trials, study.direction)]
    assert numbers == [3, 6, 8, 10, 11, 12, 13]  # best 10 and 3; others last to finish 13, 12, 11
    assert history.unfinished == set()

    small = BoundedHistory(recent=20, best=5)  # under its bound: every trial as it is
    assert small(trials, study.direction) == trials


def test_tpe_asks_from_the_bounded_history_alone():
    """The sampler on a long study asks what TPE asks on a study of the trials it keeps. Fails if
    TPE stops reading trials through ``Study._get_trials`` (an Optuna upgrade): then it would see
    the whole study."""
    old = [finished(0.1 + 0.001 * i, x=0.15 + 0.0005 * i) for i in range(120)]
    best = [finished(0.9 + 0.01 * i, x=0.6 + 0.01 * i) for i in range(5)]
    recent = [finished(0.05, x=0.8 + 0.005 * i) for i in range(20)]
    differ = 0
    for seed in range(4):
        long = optuna.create_study(
            direction="maximize",
            sampler=BoundedHistorySampler(optuna.samplers.TPESampler(seed=seed), recent=20, best=5),
        )
        long.add_trials(old[:60] + best + old[60:] + recent)
        short = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        short.add_trials(best + old[115:] + recent)  # topped up to 30 finished with the last of the old
        full = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        full.add_trials(old[:60] + best + old[60:] + recent)
        asked = [study.ask({"x": X, "opt": OPT}).params for study in (long, short, full)]
        assert asked[0] == asked[1]
        differ += asked[0] != asked[2]
    assert differ  # the whole study would have asked otherwise


def test_the_sampler_pickles_with_its_history():
    """The searcher's checkpoint pickles the study and so its sampler: the history goes on from
    where it was, without its per-ask view."""
    sampler = BoundedHistorySampler(optuna.samplers.TPESampler(seed=0), recent=4, best=2)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    ask_and_tell(study, 12)
    restored = pickle.loads(pickle.dumps(sampler))
    assert restored._view == (-1, None)
    history = restored.history  # as of the twelfth ask: trial 11 was running
    assert (history.seen, history.finished, history.unfinished) == (12, 11, {11})
    history(study.get_trials(deepcopy=False), study.direction)
    assert (history.finished, list(history.last_finished)[-4:]) == (12, [8, 9, 10, 11])


def test_past_the_bound_tpe_sees_as_many_finished_trials_as_the_bound():
    """With no pruned trials the best sets hold 25, not 50: more of the last to finish fill the
    view to 250 finished, so TPE's below set stays 25. On equal values the earlier trial is kept,
    as TPE's stable sort ranks it."""
    study = optuna.create_study(direction="maximize")
    study.add_trials([finished(0.5 if i in (3, 7) else 0.001 * (i % 50)) for i in range(300)])
    shown = BoundedHistory(recent=200, best=25)(study.get_trials(deepcopy=False), study.direction)
    assert len(shown) == 250
    history = BoundedHistory(recent=0, best=1)
    study.add_trials([finished(0.4)])
    numbers = [t.number for t in history(study.get_trials(deepcopy=False), study.direction)]
    assert numbers == [3, 300]  # the best: 3, not 7, at the same 0.5; 300 fills the view to 2
