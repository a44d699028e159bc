"""Warm starts: the finished and pruned trials of earlier searches, fitted to a new search's space.

``search/run.py --warm-start NAME`` reads search NAME's Optuna study (its study file under the
same ``--storage``, search/study_file.py) and adds its COMPLETE and PRUNED trials, with their
values and per-epoch values, to the new study before the first trial is asked for, so TPE starts
from what that search learned. A trial is carried over when every parameter it sampled is a dimension of the new
space and its value lies inside that dimension's range or choices; the others are dropped, and
the reasons are printed. An earlier search that ranked its trials by another metric, or trained
them for another number of epochs, is refused: its values do not compare.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from cellseg.errors import ConfigError
from search.searcher import EPOCHS_ATTR, METRIC_ATTR
from search.space import SearchSpace
from search.study_file import study_storage

CARRIED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
FROM_ATTR = "warm_start.from"  # Optuna user attribute: "<search>#<trial number>"


@dataclass
class WarmStart:
    """The trials carried into a new study, and per earlier search what was kept and dropped."""

    trials: list[FrozenTrial] = field(default_factory=list)
    carried: dict[str, int] = field(default_factory=dict)  # search -> trials carried over
    dropped: dict[str, Counter[str]] = field(default_factory=dict)  # search -> reason -> trials
    unchecked: list[str] = field(default_factory=list)  # searches that recorded no metric or epochs

    def notes(self) -> list[str]:
        lines = []
        for name, count in self.carried.items():
            dropped = self.dropped.get(name, Counter())
            lines.append(f"warm start from {name}: {count} trials carried, {sum(dropped.values())} dropped")
            lines.extend(f"  dropped {n}: {reason}" for reason, n in sorted(dropped.items()))
            if name in self.unchecked:
                lines.append(f"  {name} recorded no metric or max epochs (an older search): assumed the same")
        return lines

    def tag(self) -> str:
        """The parent run's link to the searches it learned from: ``name (N trials), ...``."""
        return ", ".join(f"{name} ({count} trials)" for name, count in self.carried.items())


def fitted(trial: FrozenTrial, space: SearchSpace, name: str) -> tuple[FrozenTrial | None, str]:
    """``trial`` with the new space's distributions, or None and why it does not fit."""
    by_key = {p.key: p for p in space.params}
    for key, value in trial.params.items():
        param = by_key.get(key)
        if param is None:
            return None, f"{key} is not a dimension of the new space"
        if not param.contains(param.decode(value)):
            return None, f"{key} outside the new space's {param.kind} {list(param.values)}"
    return (
        optuna.trial.create_trial(
            state=trial.state,
            value=trial.value if trial.state == TrialState.COMPLETE else None,
            params={k: by_key[k].encode(by_key[k].decode(v)) for k, v in trial.params.items()},
            distributions={k: by_key[k].distribution() for k in trial.params},
            user_attrs={FROM_ATTR: f"{name}#{trial.number}"},
            intermediate_values=dict(trial.intermediate_values),
        ),
        "",
    )


def warm_start(studies: Mapping[str, Path], space: SearchSpace, metric: str, max_epochs: int) -> WarmStart:
    """The trials of the searches ``studies`` names (search name -> its study file) that fit
    ``space``; ConfigError naming the file when a study is missing, or when it ranked trials by
    another metric than ``metric`` or trained them for other than ``max_epochs`` epochs."""
    found = WarmStart()
    for name, path in studies.items():
        if not path.is_file():
            raise ConfigError(
                f"--warm-start {name}: no Optuna study file {path}; give the name of an earlier "
                "search and the --storage it used"
            )
        try:
            study = optuna.load_study(study_name=name, storage=study_storage(path))
        except KeyError:
            raise ConfigError(f"--warm-start {name}: {path} holds no study named {name!r}") from None
        attrs = study.user_attrs
        if METRIC_ATTR not in attrs:
            found.unchecked.append(name)
        elif (attrs[METRIC_ATTR], attrs[EPOCHS_ATTR]) != (metric, max_epochs):
            raise ConfigError(
                f"--warm-start {name}: that search ranked its trials by {attrs[METRIC_ATTR]} after at "
                f"most {attrs[EPOCHS_ATTR]} epochs, this one by {metric} after {max_epochs}, so its "
                f"values do not compare; drop --warm-start {name}, or search with its train.metric "
                f"and --max-epochs {attrs[EPOCHS_ATTR]}"
            )
        found.carried[name] = 0
        for trial in study.get_trials(deepcopy=False, states=CARRIED_STATES):
            carried, reason = fitted(trial, space, name)
            if carried is None:
                found.dropped.setdefault(name, Counter())[reason] += 1
            else:
                found.trials.append(carried)
                found.carried[name] += 1
    return found
