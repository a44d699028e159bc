"""More trials for a finished search, and the Tune experiments ("phases") a search is made of.

``search/run.py --continue NAME --num-samples N`` adds N trials to the finished search NAME: the
same Optuna study (TPE goes on from every trial it has), the same MLflow parent run (reopened,
FINISHED again with a summary over all the search's trials). The settings that define the search
(data, base, space, storage, epochs, ASHA, per-trial resources) are taken from the parent run's
parameters: such a flag given again must equal the recorded value, and the space file, base config
and dataset must still be those the search recorded (its artifacts ``search/<space>`` and
``search/base-<base>`` and its dataset fingerprint), both checked before the parent run is reopened.
The re-seeding flags and ``--ci-top`` are taken from the parent run too unless given. The new trials run as a Tune experiment of their own,
``NAME--continue-<k>`` beside ``NAME``, with a fresh ASHA (it compares the new trials with each
other). Every experiment after the first is listed in the parent run's tag ``cellseg.phases``, so
that ``--resume`` restores them all (and runs only the last again: each began after the one
before it had ended).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cellseg.errors import ConfigError, TrackingError
from cellseg.tracking import SEARCH_TAG, SOURCE_TAG, RunRecord, Tracker

PHASES_TAG = "cellseg.phases"
PARENT_SOURCE = "search-parent"  # the tag SOURCE_TAG of a search's parent run
CONTINUE, RESEED = "continue", "reseed"
# run.py's destinations that define a search, taken from the parent run by --continue; given
# with --continue, such a flag must equal the recorded value
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
    "keep_top",
)
UNRECORDED = {"keep_top": "0"}  # a search from before --keep-top kept every checkpoint
# run.py's destinations taken from the parent run by --continue unless given
INHERITED = ("reseed_top", "reseeds", "reseed_split", "ci_top")
EXCLUSIVE = {"resume": "--resume", "name": "--name", "warm_start": "--warm-start"}


def search_to_continue(tracker: Tracker, experiment: str, name: str) -> RunRecord:
    """The parent run of the finished search ``name``; TrackingError when there is none or it has
    not ended FINISHED (still running, or its driver died and ``--resume`` should finish it)."""
    parents = f"tags.`{SEARCH_TAG}` = '{name}' and tags.`{SOURCE_TAG}` = '{PARENT_SOURCE}'"
    found = tracker.records(experiment, parents)
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


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Which of ``SETTINGS`` and ``INHERITED`` the command line ``argv`` gives (``parser``'s
    defaults do not count)."""
    dests = (*SETTINGS, *INHERITED)
    parser.set_defaults(**dict.fromkeys(dests))
    parsed = parser.parse_args(argv)
    return {d for d in dests if getattr(parsed, d) is not None}


def continued_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, parent: RunRecord, given: set[str]
) -> argparse.Namespace:
    """``args`` with the earlier search's name, ``SETTINGS`` and the ``INHERITED`` flags not in
    ``given`` (its parent run's params, parsed by ``parser``); ConfigError for a setting given
    with another value than the recorded one."""
    dests = (*SETTINGS, *INHERITED)
    recorded = argparse.Namespace(**{d: parent.params.get(d, UNRECORDED.get(d)) for d in dests})
    parsed = parser.parse_args(settings_argv(recorded, dests))
    name = args.continue_search
    for dest in sorted(given.intersection(SETTINGS)):
        mine, theirs = getattr(args, dest), getattr(parsed, dest)
        if not _same(mine, theirs):
            flag = _flag(dest)
            raise ConfigError(
                f"--continue {name}: {flag} {mine} differs from the search's recorded {flag} "
                f"{theirs}; drop {flag} (--continue keeps the search's settings), or start a new "
                f"search with --warm-start {name}"
            )
    kept = {d: getattr(parsed, d) for d in dests if d not in given}
    return argparse.Namespace(**{**vars(args), **kept, "name": name})


def _same(given: object, recorded: object) -> bool:
    """Equal values, or two names of the same local path."""
    if given == recorded:
        return True
    local = isinstance(given, str) and isinstance(recorded, str) and "://" not in given + recorded
    return local and Path(given).resolve() == Path(recorded).resolve()


def _flag(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"


def settings_argv(args: argparse.Namespace, dests: Sequence[str] = SETTINGS) -> list[str]:
    """The command-line flags that give ``args``'s ``dests`` (those set; a switch when true)."""
    argv: list[str] = []
    for dest in dests:
        value = getattr(args, dest)
        if value is True or value == "True":
            argv.append(_flag(dest))
        elif not (value is None or value is False or value == "False"):
            argv += [_flag(dest), str(value)]
    return argv


def without_continue(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--continue NAME`` (or an abbreviation argparse accepted)."""
    rest: list[str] = []
    skip = False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if skip:
            skip = False
        elif len(flag) > 3 and "--continue".startswith(flag):
            skip = not eq
        else:
            rest.append(arg)
    return rest


def check_unchanged(
    tracker: Tracker,
    parent: RunRecord,
    texts: Mapping[str, str],
    files: Mapping[str, Path],
    digest: str,
    data: Path,
) -> None:
    """ConfigError naming the file when the text ``texts`` would log as an artifact differs from
    the one the search ``parent`` logged (``files``: artifact -> the file it is made from), or when
    the dataset ``data`` (fingerprint ``digest``) is not the one the search trained on."""
    name = parent.tags.get(SEARCH_TAG, parent.name)
    fix = f"restore it, or start a new search with --warm-start {name}"
    with tempfile.TemporaryDirectory() as tmp:
        for artifact, text in texts.items():
            then = tracker.download_artifact(parent.run_id, artifact, tmp).read_text()
            if then != text:
                changes = changed_keys(then, text)
                added = any(" absent then," in change for change in changes)
                raise ConfigError(
                    f"--continue {name}: {files[artifact]} changed since the search started "
                    f"({''.join(c + '; ' for c in changes)}its copy then is the artifact {artifact} "
                    f"of run {parent.run_id}); {fix}"
                    + (
                        ". A key of the base config absent then is a setting cellseg added since, "
                        "which the search's trials trained without"
                        if added
                        else ""
                    )
                )
    if parent.fingerprint and parent.fingerprint != digest:
        raise ConfigError(
            f"--continue {name}: the dataset {data} changed since the search started (fingerprint "
            f"{digest}, the search trained on {parent.fingerprint}); {fix}"
        )


def changed_keys(then: str, now: str, *, shown: int = 5) -> list[str]:
    """What differs between two YAML mappings, by dotted key: ``key: <then> then, <now> now``,
    values as JSON (``absent``: a key the base config as loaded holds only now is a setting
    cellseg added since the search started); at most ``shown`` of them, then how many more; none
    when either text is not a YAML mapping."""
    try:
        before, after = (_dotted(yaml.safe_load(text)) for text in (then, now))
    except yaml.YAMLError:
        return []
    if before is None or after is None:
        return []
    changed = [
        key for key in dict.fromkeys([*before, *after]) if before.get(key, _ABSENT) != after.get(key, _ABSENT)
    ]
    lines = [f"{key}: {_shown(before, key)} then, {_shown(after, key)} now" for key in changed[:shown]]
    return lines + ([f"{len(changed) - shown} more"] if len(changed) > shown else [])


_ABSENT = object()


def _shown(leaves: Mapping[str, Any], key: str) -> str:
    return json.dumps(leaves[key], default=str) if key in leaves else "absent"


def _dotted(value: Any, prefix: str = "") -> dict[str, Any] | None:
    """A YAML mapping's leaves by dotted key (None when ``value`` is not a mapping)."""
    if not isinstance(value, dict):
        return None
    leaves: dict[str, Any] = {}
    for key, item in value.items():
        nested = _dotted(item, f"{prefix}{key}.")
        leaves.update(nested if nested is not None else {f"{prefix}{key}": item})
    return leaves


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
