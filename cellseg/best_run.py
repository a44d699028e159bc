"""Which run ``cellseg export --best`` ships, decided on plain run records.

- **Exportable runs**: trials of a search and single ``cellseg train`` runs that ended FINISHED or
  KILLED (a trial stopped early by ASHA keeps its best checkpoint) and logged their best metric.
  Parent runs, FAILED and RUNNING runs never are.
- **Groups**: the trials of one search form a group, named by the search; a training run is a
  group of its own, named by the run. A group matches ``--data`` when one of its exportable runs
  recorded the fingerprint that ``--data`` has under that run's split settings.
- **Which group**: the most recent matching group (by start time), or the one ``--search NAME``
  names, which must match too.
- **Which run**: the highest best metric within the group; equal values go to the run that
  started first, then to the smaller run id, so one store always gives the same answer. The
  caller skips a run whose checkpoint artifact is missing and takes the next; a run whose
  checkpoint its search dropped (the tag ``cellseg.checkpoint_dropped``: not among its
  ``--keep-top`` best, :func:`has_checkpoint`) is passed over without a warning, but still counts
  in its configuration's mean. ``export --best``, ``refit --best`` and the search's summary all
  take :attr:`Choice.chosen`, the first ranked run that kept its checkpoint.
- **Re-seeded configurations** (``search/run.py --reseed-top``): a trial and its exportable repeats
  (runs tagged ``cellseg.repeat_of`` with its run id) form one configuration, scored by the mean
  best metric of its runs. In a group with such configurations they rank first, by that mean
  (equal means: the configuration whose first run started first, then the smaller run id); the
  runs of one configuration follow each other, by their own best metric as above, so the run
  exported is the best seed of the best configuration. Trials never re-seeded rank after them.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cellseg.config import DataConfig, TrainConfig
from cellseg.data.fingerprint import DataFingerprint, dataset_fingerprint
from cellseg.errors import TrackingError
from cellseg.tracking import CHECKPOINT_DROPPED_TAG, REPEAT_TAG, SEARCH_TAG, RunRecord, best_metric_key

EXPORTABLE_SOURCES = ("train", "search")  # a single training run, a search's trial
EXPORTABLE_STATUSES = ("FINISHED", "KILLED")


@dataclass(frozen=True)
class Candidate:
    """An exportable run with the metric it is ranked by."""

    record: RunRecord
    metric: str  # the run's train.metric
    value: float  # its best_<metric>
    seeds: tuple[float, ...] = ()  # with repeats: the best metric of each run of its configuration
    configuration_start: float = 0.0  # with repeats: the start time of the trial they repeat

    @property
    def configuration(self) -> str:
        """The run id of the trial this run repeats, else its own."""
        return self.record.tags.get(REPEAT_TAG) or self.record.run_id

    @property
    def mean(self) -> float:
        """The mean best metric of its configuration's runs (its own value without repeats)."""
        return statistics.fmean(self.seeds) if self.seeds else self.value

    @property
    def rank_key(self) -> tuple[bool, float, float, str, float, float, str]:
        start = self.configuration_start if self.seeds else self.record.start_time
        return (
            not self.seeds,
            -self.mean,
            start,
            self.configuration,
            -self.value,
            self.record.start_time,
            self.record.run_id,
        )

    def choice_note(self) -> dict[str, object]:
        """How this run was chosen, for provenance: by its configuration's mean over seeds."""
        if not self.seeds:
            return {}
        return {
            "chosen_by": f"mean best {self.metric} over the {len(self.seeds)} seeds of its configuration",
            "configuration_run_id": self.configuration,
            "configuration_mean": self.mean,
            "configuration_values": list(self.seeds),
        }


@dataclass(frozen=True)
class Group:
    """A search's exportable trials, or one training run."""

    kind: str  # "search" or "train"
    name: str
    started: float  # seconds since the epoch
    candidates: tuple[Candidate, ...]

    def describe(self) -> str:
        data = sorted({_data_label(c.record) for c in self.candidates})
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started))
        return (
            f"{self.kind} {self.name!r}: {len(self.candidates)} exportable run(s), data "
            f"{', '.join(data)}, started {when}"
        )


@dataclass(frozen=True)
class Choice:
    """The group chosen for ``--data`` and its matching runs, best first."""

    group: Group
    ranked: tuple[Candidate, ...]
    data: DataFingerprint

    @property
    def search(self) -> str | None:
        return self.group.name if self.group.kind == "search" else None

    @property
    def kept(self) -> tuple[Candidate, ...]:
        """The ranked runs whose checkpoint their search kept, best first."""
        return tuple(c for c in self.ranked if has_checkpoint(c.record))

    @property
    def chosen(self) -> Candidate:
        """The run ``export --best`` and ``refit --best`` take: the first ranked run that kept its
        checkpoint (the first ranked when none did)."""
        return first_kept(self.ranked)


def candidate(record: RunRecord) -> Candidate | None:
    """The record as a candidate, or None when it cannot be exported."""
    if record.source not in EXPORTABLE_SOURCES or record.status not in EXPORTABLE_STATUSES:
        return None
    metric = record.params.get("train.metric", TrainConfig.metric)
    value = record.metrics.get(best_metric_key(metric))
    if value is None or not math.isfinite(value):
        return None
    return Candidate(record, metric, value)


def has_checkpoint(record: RunRecord) -> bool:
    """False when the run's search dropped its checkpoint (``--keep-top``)."""
    return CHECKPOINT_DROPPED_TAG not in record.tags


def first_kept(runs: Sequence[Candidate]) -> Candidate:
    """The first of ``runs`` (not empty, in ``export --best``'s order) that kept its checkpoint;
    the first when none did."""
    return next((c for c in runs if has_checkpoint(c.record)), runs[0])


def search_name(parent: RunRecord) -> str:
    """The name of the search whose parent run is ``parent``."""
    return parent.tags.get(SEARCH_TAG) or parent.name


def groups(records: list[RunRecord]) -> list[Group]:
    """The groups with at least one exportable run, the most recent first."""
    by_id = {r.run_id: r for r in records}
    members: dict[tuple[str, str], list[Candidate]] = {}
    started: dict[tuple[str, str], float] = {}
    for record in records:
        found = candidate(record)
        if found is None:
            continue
        if record.source == "search":
            parent = by_id.get(record.parent_id or "")
            name = search_name(parent) if parent else str(record.parent_id)
            key = ("search", name)
            start = parent.start_time if parent else record.start_time
        else:
            key, start = ("train", record.name), record.start_time
        members.setdefault(key, []).append(found)
        started[key] = min(started.get(key, start), start)
    found_groups = [
        Group(
            kind,
            name,
            started[(kind, name)],
            tuple(export_order(members[(kind, name)])),
        )
        for kind, name in members
    ]
    return sorted(found_groups, key=lambda g: g.started, reverse=True)


def with_repeats(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates of one group, those of a re-seeded configuration given all its values."""
    by_configuration: dict[str, list[Candidate]] = {}
    for found in sorted(candidates, key=lambda c: c.record.start_time):
        by_configuration.setdefault(found.configuration, []).append(found)
    starts = {c.record.run_id: c.record.start_time for c in candidates}
    return [
        replace(
            c,
            seeds=tuple(m.value for m in by_configuration[c.configuration]),
            configuration_start=starts.get(c.configuration, c.record.start_time),
        )
        if len(by_configuration[c.configuration]) > 1
        else c
        for c in candidates
    ]


def fingerprints_of(data_root: str | Path) -> Callable[[RunRecord], DataFingerprint]:
    """The fingerprint ``data_root`` has under a run's split settings (its ``data.val_fraction``
    and ``data.split_seed``), which the run recorded if it trained on that data; one scan a split."""

    @functools.cache
    def under_split(val_fraction: float, split_seed: int) -> DataFingerprint:
        return dataset_fingerprint(
            DataConfig(root=str(data_root), val_fraction=val_fraction, split_seed=split_seed)
        )

    return lambda record: under_split(
        float(record.params.get("data.val_fraction", DataConfig.val_fraction)),
        int(record.params.get("data.split_seed", DataConfig.split_seed)),
    )


def export_order(candidates: list[Candidate]) -> list[Candidate]:
    """One group's candidates in ``export --best``'s order, re-seeded configurations first."""
    return sorted(with_repeats(candidates), key=lambda c: c.rank_key)


def ranked_candidates(records: Sequence[RunRecord]) -> list[Candidate]:
    """The exportable runs among ``records`` (one group's) in ``export --best``'s order."""
    return export_order([c for c in map(candidate, records) if c is not None])


def choose(
    records: list[RunRecord],
    data_root: str | Path,
    *,
    search: str | None = None,
    where: str = "the experiment",
) -> Choice:
    """The group for ``data_root`` (or the one named ``search``) and its matching runs, ranked.

    TrackingError, listing every group with its data and date, when none matches.
    """
    data_for = fingerprints_of(data_root)
    all_groups = groups(records)
    named = [g for g in all_groups if search is None or g.name == search]
    for group in named:
        ranked = tuple(c for c in group.candidates if c.record.fingerprint == data_for(c.record).digest)
        if ranked:
            return Choice(group, ranked, data_for(ranked[0].record))
    data = dataset_fingerprint(DataConfig(root=str(data_root)))
    wanted = f"search or training run named {search!r}" if search else "search or training run"
    listing = "\n".join(f"  {g.describe()}" for g in all_groups) or "  (no exportable run at all)"
    raise TrackingError(
        f"no {wanted} in {where} trained on {data.root} ({data.name}@{data.digest}, "
        f"{data.train_images} training images); exportable runs:\n{listing}\n"
        "Train or search on this data, pass --search NAME for a search on the same data, or "
        "--run-id RUN to export one run whatever its data."
    )


def _data_label(record: RunRecord) -> str:
    root = record.params.get("data.root")
    name = Path(root).name if root else "?"
    return f"{name}@{record.fingerprint}" if record.fingerprint else f"{name} (unrecorded)"
