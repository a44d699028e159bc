"""What the inference search varies, as a define-by-run space any ask/tell optimiser can sample.

``suggest_settings`` asks a trial (Optuna's ``Trial`` satisfies ``Suggester``) for each value;
``grid_values`` gives the same names a small grid for a grid search. The library imports no
optimiser: the study lives in ``search/tune_inference.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cellseg.errors import ConfigError
from cellseg.inference_settings import CacheSettings, InferenceSettings, parse_scales, scales_label


class Suggester(Protocol):
    """The part of an optimiser's trial the space uses (Optuna's ``Trial`` has it)."""

    def suggest_float(self, name: str, low: float, high: float) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class SettingsSpace:
    """Ranges of the searched settings; the cache bounds NMS IoU and detections from above."""

    cache: CacheSettings
    scales: tuple[float, ...] = (1.0,)  # test scales, each predicted once (a pass per view)
    flips: tuple[str, ...] = ()  # the flipped views TTA adds; () leaves TTA off and unsearched
    models: int = 1  # ensemble members cached, best first; above 1 the ensemble size is searched
    score_threshold: tuple[float, float] = (0.0, 0.5)  # AP50 rewards keeping nearly everything
    nms_iou_min: float = 0.2  # the leaderboard's best used 0.2-0.5
    detections_min: int = 50  # 50 -> 250 per image moved one reference result 0.33 -> 0.44
    mask_threshold: tuple[float, float] = (0.3, 0.7)  # around torchvision's 0.5
    merge_iou: tuple[float, float] = (0.3, 0.8)  # around cellseg.tta's default 0.55

    def __post_init__(self) -> None:
        checks = [
            (
                len(set(map(float, self.scales))) == len(self.scales),
                f"--scales {' '.join(map(str, self.scales))}: a scale is given twice; give each once",
            ),
            (
                1.0 in self.scales and all(s > 0 for s in self.scales),
                f"--scales {' '.join(map(str, self.scales))}: positive numbers including 1 (the "
                "model as trained, the baseline)",
            ),
            (
                self.nms_iou_min <= self.cache.nms_iou <= 1,
                f"--cache-nms-iou {self.cache.nms_iou}: must lie in [{self.nms_iou_min}, 1]",
            ),
            (
                self.detections_min <= self.cache.detections,
                f"--cache-detections {self.cache.detections}: must be at least {self.detections_min}",
            ),
            (0 <= self.score_threshold[0] <= self.score_threshold[1] < 1, "score threshold range in [0, 1)"),
            (0 < self.mask_threshold[0] <= self.mask_threshold[1] < 1, "mask threshold range in (0, 1)"),
            (0 < self.merge_iou[0] <= self.merge_iou[1] <= 1, "merge IoU range in (0, 1]"),
            (self.models >= 1, f"--ensemble {self.models}: give 1 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"inference search: {message}")


def scale_sets(scales: Sequence[float]) -> list[str]:
    """Every non-empty set of the test scales, as ``scales_label``s: each scale alone, then
    merged pairs, and so on (3 scales: 7 sets)."""
    ordered = sorted(set(scales))
    return [
        scales_label(chosen)
        for size in range(1, len(ordered) + 1)
        for chosen in itertools.combinations(ordered, size)
    ]


def suggest_settings(trial: Suggester, space: SettingsSpace) -> InferenceSettings:
    """One point of ``space``, asked of ``trial`` (the merge IoU only when passes are merged)."""
    scales = parse_scales(trial.suggest_categorical("scales", scale_sets(space.scales)))
    models = trial.suggest_int("models", 1, space.models) if space.models > 1 else 1
    tta = bool(space.flips) and trial.suggest_categorical("tta", [False, True])
    merged = tta or len(scales) > 1 or models > 1
    merge_iou = trial.suggest_float("merge_iou", *space.merge_iou) if merged else InferenceSettings.merge_iou
    return InferenceSettings(
        scales=scales,
        flips=space.flips if tta else (),
        models=models,
        merge_iou=merge_iou,
        score_threshold=trial.suggest_float("score_threshold", *space.score_threshold),
        nms_iou=trial.suggest_float("nms_iou", space.nms_iou_min, space.cache.nms_iou),
        class_agnostic=trial.suggest_categorical("class_agnostic", [False, True]),
        detections=trial.suggest_int("detections", space.detections_min, space.cache.detections, log=True),
        mask_threshold=trial.suggest_float("mask_threshold", *space.mask_threshold),
        cache=space.cache,
    )


def grid_values(space: SettingsSpace) -> dict[str, list[Any]]:
    """A grid over the same names (three values per range, its ends and middle; every ensemble
    size); the merge IoU is fixed at cellseg.tta's default, so that a grid point without merged
    passes is not repeated."""

    def three(low: float, high: float) -> list[float]:
        return sorted({low, (low + high) / 2, high})

    grid: dict[str, list[Any]] = {"scales": scale_sets(space.scales)}
    if space.models > 1:
        grid["models"] = list(range(1, space.models + 1))
    if space.flips:
        grid["tta"] = [False, True]
    if space.flips or len(grid["scales"]) > 1 or space.models > 1:
        grid["merge_iou"] = [InferenceSettings.merge_iou]
    low, high = space.detections_min, space.cache.detections
    return {
        **grid,
        "score_threshold": three(*space.score_threshold),
        "nms_iou": three(space.nms_iou_min, space.cache.nms_iou),
        "class_agnostic": [False, True],
        "detections": sorted({low, round((low * high) ** 0.5), high}),
        "mask_threshold": three(*space.mask_threshold),
    }
