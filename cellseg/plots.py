"""PNG pictures of training histories, predictions, result statistics and searches.

Figures are drawn with matplotlib's object API and saved through the Agg canvas, so no display,
no pyplot state and no global backend switch are involved.
"""

from __future__ import annotations

import math
from collections import Counter
from numbers import Real
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from pycocotools import mask as mask_utils

from cellseg.evaluation import ImagePrediction, ImageTruth
from cellseg.task import NUM_CLASSES

CLASS_COLORS = {1: "tab:red", 2: "tab:blue", 3: "tab:green", 4: "tab:orange"}
_METRIC_KEYS = ("segm_AP50", "segm_AP", "bbox_AP50")


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    rows = [row for row in history if key in row]
    return [row.get("epoch", i) for i, row in enumerate(rows)], [row[key] for row in rows]


def plot_history(history: list[dict[str, float]], path: Path) -> Path:
    """Loss curves (every key containing "loss") and metric curves per epoch; missing keys are skipped."""
    loss_keys = sorted({key for row in history for key in row if "loss" in key})
    figure = Figure(figsize=(11, 4))
    losses, metrics = figure.subplots(1, 2)
    for key in loss_keys:
        losses.plot(*_series(history, key), marker=".", label=key)
    for key in _METRIC_KEYS:
        if any(key in row for row in history):
            metrics.plot(*_series(history, key), marker=".", label=key)
    losses.set(title="losses", xlabel="epoch")
    metrics.set(title="validation metrics", xlabel="epoch", ylim=(0, 1))
    for axes in (losses, metrics):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.lines:
            axes.legend(fontsize="small")
    return _save(figure, path)


def _overlay(image: np.ndarray, labels: np.ndarray, rles: list[dict]) -> np.ndarray:
    """The image with each instance blended in its class colour (one mask decoded at a time)."""
    shown = np.clip(np.asarray(image, dtype=np.float32), 0, 1).copy()
    for label, rle in zip(labels, rles):
        mask = mask_utils.decode(rle).astype(bool)
        color = np.array(to_rgb(CLASS_COLORS.get(int(label), "white")), dtype=np.float32)
        shown[mask] = 0.5 * shown[mask] + 0.5 * color
    return shown


def plot_predictions(
    image: np.ndarray,
    truth: ImageTruth,
    prediction: ImagePrediction,
    path: Path,
    score_threshold: float = 0.5,
) -> Path:
    """Ground truth and predictions scoring at least ``score_threshold`` side by side, coloured by class."""
    keep = np.flatnonzero(prediction.scores >= score_threshold)
    panels = [
        (f"truth ({len(truth.rles)})", truth.labels, truth.rles),
        (
            f"predicted, score >= {score_threshold:g} ({len(keep)})",
            prediction.labels[keep],
            [prediction.rles[i] for i in keep],
        ),
    ]
    figure = Figure(figsize=(12, 6))
    axes = figure.subplots(1, 2)
    for ax, (title, labels, rles) in zip(axes, panels):
        ax.imshow(_overlay(image, labels, rles))
        ax.set_title(title)
        ax.axis("off")
    handles = [Patch(color=c) for c in CLASS_COLORS.values()]
    figure.legend(handles, [f"class{k}" for k in CLASS_COLORS], loc="lower center", ncol=len(CLASS_COLORS))
    return _save(figure, path)


def plot_class_distribution(results: list[dict], path: Path) -> Path:
    """Bar chart of predicted instances per category and a histogram of their scores."""
    counts = Counter(int(r["category_id"]) for r in results)
    classes = list(range(1, NUM_CLASSES + 1))
    figure = Figure(figsize=(10, 4))
    bars, scores = figure.subplots(1, 2)
    bars.bar(
        [f"class{k}" for k in classes], [counts[k] for k in classes], color=[CLASS_COLORS[k] for k in classes]
    )
    bars.set(title=f"predicted instances ({len(results)})", ylabel="count")
    scores.hist([r["score"] for r in results], bins=20, range=(0, 1), color="gray")
    scores.set(title="scores", xlabel="score", ylabel="count")
    return _save(figure, path)


def plot_trial_curves(
    curves: dict[str, list[tuple[int, float]]], path: Path, metric: str = "segm_AP50"
) -> Path:
    """One line of ``metric`` per epoch for each trial."""
    figure = Figure(figsize=(8, 5))
    ax = figure.subplots()
    for name, points in curves.items():
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker=".", label=name)
    ax.set(title=f"{metric} per trial", xlabel="epoch", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if 0 < len(ax.lines) <= 20:
        ax.legend(fontsize="x-small")
    return _save(figure, path)


def _axis_positions(values: list) -> tuple[np.ndarray, list[float], list[str]]:
    """Values mapped to [0, 1] with tick positions and labels: numbers min-max, other values as levels."""
    if all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        numbers = np.asarray(values, dtype=float)
        low, high = numbers.min(), numbers.max()
        span = high - low if high > low else 1.0
        return (numbers - low) / span, [0.0, 1.0], [f"{low:.3g}", f"{high:.3g}"]
    levels = sorted({str(v) for v in values})
    spacing = 1.0 / max(len(levels) - 1, 1)
    positions = {level: i * spacing for i, level in enumerate(levels)}
    return np.array([positions[str(v)] for v in values]), list(positions.values()), levels


def plot_parallel_coordinates(rows: list[dict], metric: str, path: Path) -> Path:
    """Parallel coordinates of every parameter shared by the rows, lines coloured by ``metric``."""
    rows = [row for row in rows if isinstance(row.get(metric), Real) and math.isfinite(row[metric])]
    params = sorted(set.intersection(*(set(row) for row in rows)) - {metric}) if rows else []
    figure = Figure(figsize=(max(6, 1.6 * len(params) + 2), 5))
    ax = figure.subplots()
    if rows and params:
        scores = np.array([row[metric] for row in rows], dtype=float)
        columns = []
        for x, param in enumerate(params):
            positions, ticks, labels = _axis_positions([row[param] for row in rows])
            columns.append(positions)
            ax.axvline(x, color="black", linewidth=0.8)
            for tick, label in zip(ticks, labels):
                ax.annotate(label, (x, tick), xytext=(3, 0), textcoords="offset points", fontsize="x-small")
        norm = Normalize(scores.min(), scores.max())
        cmap = colormaps["viridis"]
        for line, score in zip(np.stack(columns, axis=1), scores):
            ax.plot(range(len(params)), line, color=cmap(norm(score)), alpha=0.8)
        figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
        ax.set_xticks(range(len(params)), params, rotation=30, ha="right", fontsize="small")
    ax.set(title=f"parameters coloured by {metric}", yticks=[], ylim=(-0.05, 1.05))
    return _save(figure, path)


def plot_inference_search(values: list[float], before: float, path: Path, metric: str = "segm_AP50") -> Path:
    """The inference search: each trial's validation ``metric``, the best so far, and the
    model's own settings (``before``) as a dashed line."""
    figure = Figure(figsize=(8, 4.5))
    ax = figure.subplots()
    trials = np.arange(len(values))
    ax.scatter(trials, values, s=12, color="gray", label="trial")
    if values:
        ax.plot(trials, np.maximum.accumulate(values), color="tab:blue", label="best so far")
    ax.axhline(before, color="tab:red", linestyle="--", label=f"model's own settings ({before:.4f})")
    ax.set(title=f"inference settings: validation {metric}", xlabel="trial", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return _save(figure, path)
