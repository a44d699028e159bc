"""Re-seeding the best configurations of a search, and the choice by their mean over seeds.

``search/run.py --reseed-top K --reseeds S`` trains the K best trials that ran every epoch again
with S other training seeds (``train.seed`` + 1, + 2, ...; with ``--reseed-split`` the validation
split's ``data.split_seed`` moves with it) once the search's trials have ended. Every repeat is a
trial of the same search: a child run of its parent run, tagged with the run it repeats
(``cellseg.repeat_of``), that run's trial (``cellseg.repeat_of_trial``) and its seeds. The repeats
train to the last epoch (no ASHA) as a Tune experiment of their own beside the search's, and
Optuna never sees them. ``cellseg.best_run`` then ranks a re-seeded configuration by the mean best
metric of its runs, and ``cellseg export --best`` exports the best seed of the best configuration.
"""

from __future__ import annotations

import json
import pickle
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher

from cellseg.best_run import Candidate, candidate, first_kept, ranked_candidates
from cellseg.errors import ConfigError
from cellseg.tracking import REPEAT_TAG, RunRecord
from search.trainable import REUSE_WORKERS, trial_dirname
from search.trial_runs import TRIAL_TAG

SEED_TAG = "cellseg.seed"
SPLIT_SEED_TAG = "cellseg.split_seed"
REPEAT_TRIAL_TAG = "cellseg.repeat_of_trial"
SEED_KEY, SPLIT_SEED_KEY = "train.seed", "data.split_seed"


@dataclass(frozen=True)
class Repeat:
    """One more training of a trial's configuration with other seeds."""

    trial_id: str  # the Tune trial it repeats
    run_id: str  # that trial's MLflow run
    config: dict[str, Any]  # the trial's sampled values with the seeds
    seed: int
    split_seed: int

    @property
    def tags(self) -> dict[str, str]:
        return {
            REPEAT_TAG: self.run_id,
            REPEAT_TRIAL_TAG: self.trial_id,
            SEED_TAG: str(self.seed),
            SPLIT_SEED_TAG: str(self.split_seed),
        }


def check_reseed_flags(top: int, reseeds: int) -> None:
    """ConfigError for a negative ``--reseed-top`` or a ``--reseeds`` below 1."""
    if top < 0:
        raise ConfigError(
            f"--reseed-top {top}: give the number of best configurations to re-seed, 0 for none"
        )
    if reseeds < 1:
        raise ConfigError(f"--reseeds {reseeds}: give the number of other seeds per configuration, 1 or more")


def plan_repeats(
    records: Sequence[RunRecord],
    configs: Mapping[str, dict[str, Any]],
    *,
    top: int,
    reseeds: int,
    base_seed: int,
    base_split_seed: int,
    vary_split: bool,
) -> list[Repeat]:
    """``reseeds`` repeats for each of the ``top`` best configurations (the search's child
    ``records`` that ran every epoch, ranked by their own best metric as ``export --best`` ranks
    runs; a trial whose sampled values equal a better one's is passed over); a trial repeated
    before gets only the repeats it lacks, with seeds it has not used. Every planned repeat has
    its own values, so :class:`RepeatTags` tells them apart. ``configs`` maps Tune trial ids to
    their sampled values (trials without one are passed over).
    """
    originals = [
        found
        for found in map(candidate, records)
        if found is not None
        and found.record.status == "FINISHED"
        and REPEAT_TAG not in found.record.tags
        and found.record.tags.get(TRIAL_TAG) in configs
    ]
    by_config: dict[str, Candidate] = {}  # the best trial of each configuration, best first
    for original in sorted(originals, key=lambda c: c.rank_key):
        by_config.setdefault(_config_key(configs[original.record.tags[TRIAL_TAG]]), original)
    planned: list[Repeat] = []
    for original in list(by_config.values())[:top]:
        trial_id = original.record.tags[TRIAL_TAG]
        config = configs[trial_id]
        earlier = [r for r in records if r.tags.get(REPEAT_TAG) == original.record.run_id]
        used = {int(r.tags[SEED_TAG]) for r in earlier if SEED_TAG in r.tags}
        lacking = max(reseeds - sum(r.status == "FINISHED" for r in earlier), 0)
        seed = int(config.get(SEED_KEY, base_seed))
        split_seed = int(config.get(SPLIT_SEED_KEY, base_split_seed))
        planned_keys = {_config_key(r.config) for r in planned}
        offset = 0
        while lacking:
            offset += 1
            split = split_seed + offset if vary_split else split_seed
            values = {**config, SEED_KEY: seed + offset, **({SPLIT_SEED_KEY: split} if vary_split else {})}
            if seed + offset in used or _config_key(values) in planned_keys:
                continue  # a seed this trial used, or another trial's repeat (a searched seed)
            planned.append(Repeat(trial_id, original.record.run_id, values, seed + offset, split))
            lacking -= 1
    return planned


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


class RepeatTags:
    """The MLflow tags of a repeat's run, found by its trial's config (no tags for other trials)."""

    def __init__(self, repeats: Sequence[Repeat]) -> None:
        self.by_config = {_config_key(r.config): r.tags for r in repeats}

    def __call__(self, config: Mapping[str, Any]) -> dict[str, str]:
        return self.by_config.get(_config_key(config), {})


class RepeatSearcher(Searcher):
    """Tune's searcher for the repeats: each config once, in order, then FINISHED."""

    def __init__(self, configs: Sequence[dict[str, Any]]) -> None:
        super().__init__()
        self.queue = [dict(c) for c in configs]

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        return self.queue.pop(0) if self.queue else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Nothing to learn: the repeats are fixed in advance."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.queue, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as saved:
            self.queue = pickle.load(saved)


def repeat_tuner(
    trainable: Any,
    repeats: Sequence[Repeat],
    *,
    metric: str,
    max_concurrent: int,
    run_config: tune.RunConfig,
) -> tune.Tuner:
    """A Tuner that trains every repeat once, to its last epoch."""
    searcher = RepeatSearcher([r.config for r in repeats])
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            search_alg=ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher,
            num_samples=len(repeats),
            trial_dirname_creator=trial_dirname,
            reuse_actors=REUSE_WORKERS,
        ),
        run_config=run_config,
    )


@dataclass(frozen=True)
class SeededChoice:
    """The re-seeded configurations of a search, best first, and the run export --best takes."""

    metric: str
    configurations: tuple[tuple[Candidate, ...], ...]  # each: its runs, best seed first

    @property
    def chosen(self) -> Candidate:
        """The run ``export --best`` and ``refit --best`` take: the first run, in this order,
        that kept its checkpoint (``--keep-top``)."""
        return first_kept([run for runs in self.configurations for run in runs])

    def lines(self) -> list[str]:
        rows = []
        for runs in self.configurations:
            head = runs[0]
            spread = f" ± {statistics.stdev(head.seeds):.4f}" if len(head.seeds) > 1 else ""
            values = ", ".join(f"{v:.4f}" for v in head.seeds)
            original = next((r for r in runs if r.record.run_id == head.configuration), head)
            rows.append(
                f"  {original.record.name}: mean {head.mean:.4f}{spread} over {len(head.seeds)} seeds ({values})"
            )
        chosen = self.chosen
        which = (
            "the best seed of the best configuration"
            if chosen is self.configurations[0][0]
            else "the first run of this order that kept its checkpoint (--keep-top)"
        )
        return [
            f"re-seeded configurations, by mean best {self.metric} over seeds:",
            *rows,
            f"chosen by mean over seeds: run {chosen.record.name} ({chosen.record.run_id}, "
            f"{self.metric} {chosen.value:.4f}), {which}; export --best and refit --best take it",
        ]

    def tags(self) -> dict[str, str]:
        return {
            "choice.rule": f"mean best {self.metric} over seeds",
            "choice.run_id": self.chosen.record.run_id,
            "choice.configuration_run_id": self.chosen.configuration,
        }


def seeded_choice(children: Sequence[RunRecord]) -> SeededChoice | None:
    """The search's re-seeded configurations ranked as ``export --best`` ranks them; None when
    no configuration has repeats."""
    ranked = ranked_candidates(children)
    seeded = [c for c in ranked if c.seeds]
    if not seeded:
        return None
    configurations = [
        tuple(c for c in seeded if c.configuration == key)
        for key in dict.fromkeys(c.configuration for c in seeded)
    ]
    return SeededChoice(seeded[0].metric, tuple(configurations))
