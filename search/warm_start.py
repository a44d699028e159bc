"""Warm starts: the finished and pruned trials of earlier searches, fitted to a new search's space.

``search/run.py --warm-start NAME`` reads search NAME's Optuna study (its ``optuna.db`` under the
same ``--storage``) and adds its COMPLETE and PRUNED trials, with their values and per-epoch
values, to the new study before the first trial is asked for, so TPE starts from what that
search learned. A trial is carried over when every parameter it sampled is a dimension of the new
space and its value lies inside that dimension's range or choices; the others are dropped, and
the reasons are printed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from cellseg.errors import ConfigError
from search.space import SearchSpace

CARRIED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
FROM_ATTR = "warm_start.from"  # Optuna user attribute: "<search>#<trial number>"


@dataclass
class WarmStart:
    """The trials carried into a new study, and per earlier search what was kept and dropped."""

    trials: list[FrozenTrial] = field(default_factory=list)
    carried: dict[str, int] = field(default_factory=dict)  # search -> trials carried over
    dropped: dict[str, Counter[str]] = field(default_factory=dict)  # search -> reason -> trials

    def notes(self) -> list[str]:
        lines = []
        for name, count in self.carried.items():
            dropped = self.dropped.get(name, Counter())
            lines.append(f"warm start from {name}: {count} trials carried, {sum(dropped.values())} dropped")
            lines.extend(f"  dropped {n}: {reason}" for reason, n in sorted(dropped.items()))
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


def warm_start(studies: Mapping[str, Path], space: SearchSpace) -> WarmStart:
    """The trials of the searches ``studies`` names (search name -> its study file) that fit
    ``space``; ConfigError naming the file when a study is missing."""
    found = WarmStart()
    for name, path in studies.items():
        if not path.is_file():
            raise ConfigError(
                f"--warm-start {name}: no Optuna study file {path}; give the name of an earlier "
                "search and the --storage it used"
            )
        try:
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{path}")
        except KeyError:
            raise ConfigError(f"--warm-start {name}: {path} holds no study named {name!r}") from None
        found.carried[name] = 0
        for trial in study.get_trials(deepcopy=False, states=CARRIED_STATES):
            carried, reason = fitted(trial, space, name)
            if carried is None:
                found.dropped.setdefault(name, Counter())[reason] += 1
            else:
                found.trials.append(carried)
                found.carried[name] += 1
    return found
