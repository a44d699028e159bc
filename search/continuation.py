"""More trials for a finished search, and the Tune experiments ("phases") a search is made of.

``search/run.py --continue NAME --num-samples N`` adds N trials to the finished search NAME: the
same Optuna study (TPE goes on from every trial it has), the same MLflow parent run (reopened,
FINISHED again with a summary over all the search's trials). The settings that define the search
(data, base, space, storage, epochs, ASHA, per-trial resources) are taken from the parent run's
parameters, not from the command line. The new trials run as a Tune experiment of their own,
``NAME--continue-<k>`` beside ``NAME``, with a fresh ASHA (it compares the new trials with each
other). Every experiment after the first is listed in the parent run's tag ``cellseg.phases``, so
that ``--resume`` restores them all (and runs only the last again: each began after the one
before it had ended).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cellseg.errors import ConfigError, TrackingError
from cellseg.tracking import SEARCH_TAG, RunRecord, Tracker

PHASES_TAG = "cellseg.phases"
CONTINUE, RESEED = "continue", "reseed"
# run.py's destinations that define a search, taken from the parent run by --continue
SETTINGS = (
    "data",
    "base",
    "space",
    "storage",
    "max_epochs",
    "grace_period",
    "reduction_factor",
    "gpus_per_trial",
    "cpus_per_trial",
    "max_concurrent",
    "max_failures",
    "seed",
)
EXCLUSIVE = {"resume": "--resume", "name": "--name", "warm_start": "--warm-start"}


def search_to_continue(tracker: Tracker, experiment: str, name: str) -> RunRecord:
    """The parent run of the finished search ``name``; TrackingError when there is none or it has
    not ended FINISHED (still running, or its driver died and ``--resume`` should finish it)."""
    found = [
        r
        for r in tracker.records(experiment, f"tags.`{SEARCH_TAG}` = '{name}'")
        if r.source == "search-parent"
    ]
    if not found:
        raise TrackingError(
            f"--continue {name}: no search named {name!r} in experiment {experiment!r} of "
            f"{tracker.uri}; check --experiment and --tracking-uri"
        )
    status = found[0].status
    if status == "RUNNING":
        raise TrackingError(
            f"--continue {name}: the search is still running (its parent run is RUNNING); wait "
            f"for it to end, or if its driver died, finish it first with --resume --name {name}"
        )
    if status != "FINISHED":
        raise TrackingError(
            f"--continue {name}: the search ended {status}; finish it first with --resume --name {name}"
        )
    return found[0]


def check_continue_flags(args: argparse.Namespace) -> None:
    """ConfigError for ``--continue`` with ``--resume``, ``--name`` or ``--warm-start``, which have
    no meaning there."""
    for dest, flag in EXCLUSIVE.items():
        if getattr(args, dest):
            raise ConfigError(f"--continue adds trials to an existing search: drop {flag}")


def continued_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, parent: RunRecord
) -> argparse.Namespace:
    """``args`` with the earlier search's name and ``SETTINGS`` (its parent run's params, parsed
    by ``parser``)."""
    recorded = argparse.Namespace(**{d: parent.params.get(d) for d in SETTINGS})
    parsed = parser.parse_args(settings_argv(recorded))
    return argparse.Namespace(
        **{**vars(args), **{d: getattr(parsed, d) for d in SETTINGS}, "name": args.continue_search}
    )


def settings_argv(args: argparse.Namespace) -> list[str]:
    """The command-line flags that give ``args``'s ``SETTINGS`` (those set)."""
    argv: list[str] = []
    for dest in SETTINGS:
        value = getattr(args, dest)
        if value is not None:
            argv += [f"--{dest.replace('_', '-')}", str(value)]
    return argv


def recorded_phases(parent: RunRecord) -> list[str]:
    """The search's Tune experiments after its first, in the order they ran."""
    return [p for p in parent.tags.get(PHASES_TAG, "").split(",") if p]


def next_phase(name: str, kind: str, phases: Sequence[str]) -> str:
    """The name of the search's next ``kind`` experiment: ``NAME--<kind>-<k>``."""
    return f"{name}--{kind}-{1 + sum(phase_kind(name, p) == kind for p in phases)}"


def phase_kind(name: str, phase: str) -> str:
    """``continue`` or ``reseed``, from the name of a Tune experiment of the search ``name``;
    ``""`` for its first (``name`` itself, which may look like a later one's)."""
    if phase == name:
        return ""
    return phase.removeprefix(f"{name}--").rpartition("-")[0]


def record_phase(tracker: Tracker, parent_run_id: str, phases: list[str], phase: str) -> None:
    """Append ``phase`` to ``phases`` and to the parent run's tag, before it runs."""
    phases.append(phase)
    tracker.set_tags(parent_run_id, {PHASES_TAG: ",".join(phases)})
