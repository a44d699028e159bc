"""``--keep-top`` ranked over the contenders (the trials that keep a checkpoint and the runs of
their configurations) drops the same checkpoints as ranked over every ended trial, through 400
closes with ties and re-seeded configurations (each followed by a close applied again), while the
contenders stay few."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from cellseg.best_run import Candidate, export_order
from cellseg.tracking import CHECKPOINT_DROPPED_TAG, REPEAT_TAG, RunRecord
from search.trial_runs import EndedTrials, beyond_top

KEEP = 3


def ended(number: int, value: float, repeats: str | None) -> Candidate:
    tags = {REPEAT_TAG: repeats} if repeats else {}
    record = RunRecord(f"run{number:04d}", f"trial {number}", "FINISHED", float(number), tags, {}, {})
    return Candidate(record, "segm_AP50", value)


def dropped(run: Candidate, reason: str) -> Candidate:
    return replace(run, record=replace(run.record, tags={**run.record.tags, CHECKPOINT_DROPPED_TAG: reason}))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contenders_drop_what_ranking_every_trial_drops(seed: int) -> None:
    rng = random.Random(seed)
    indexed, every = EndedTrials(), {}
    largest = 0
    for number in range(400):
        # values on a coarse grid (ties); a fifth of the trials re-seed an earlier configuration
        repeats = f"run{rng.randrange(number):04d}" if number and rng.random() < 0.2 else None
        if repeats and every[repeats].configuration != repeats:
            repeats = every[repeats].configuration
        found = ended(number, round(rng.random(), 1), repeats)
        ours, theirs = beyond_top(indexed.contenders(found), KEEP), beyond_top([*every.values(), found], KEEP)
        assert [c.record.run_id for c in ours[0]] == [c.record.run_id for c in theirs[0]], number
        if any(c.record.run_id == found.record.run_id for c in theirs[0]):
            found = dropped(found, theirs[1])
        indexed.put(found)
        every[found.record.run_id] = found
        ours, theirs = beyond_top(indexed.contenders(), KEEP), beyond_top(list(every.values()), KEEP)
        assert [c.record.run_id for c in ours[0]] == [c.record.run_id for c in theirs[0]], number
        for out in theirs[0]:
            every[out.record.run_id] = dropped(every[out.record.run_id], theirs[1])
            indexed.put(dropped(indexed.runs[out.record.run_id], theirs[1]))
        largest = max(largest, len(indexed.contenders()))
        replayed = every[f"run{rng.randrange(number + 1):04d}"]  # a close applied again
        ours = beyond_top(indexed.contenders(replayed), KEEP)
        theirs = beyond_top(list(every.values()), KEEP)
        assert [c.record.run_id for c in ours[0]] == [c.record.run_id for c in theirs[0]], number
    kept = [c for c in every.values() if CHECKPOINT_DROPPED_TAG not in c.record.tags]
    assert len(kept) == KEEP
    assert any(c.seeds for c in export_order(list(every.values()))), "no re-seeded configuration"
    assert largest < 20, f"the contenders grew to {largest} of 400 trials"
