"""Cheaper validation at ASHA's rungs: does its ranking agree with the full validation's?

``--configs`` configurations are drawn at random (seeded) from the demo space on the demo config;
each trains the rung's epochs (``--epochs``, 1 by default: ASHA's first rung in the demo search)
with one thread, as a trial does. Then the model is validated the full way (every validation
image, ``model.detections_per_img`` detections each, as ``fit`` validates) and the cheaper ways:
fewer detections per image, half of the validation images, and both. For each way: seconds per
validation (median over the configurations; the validation images are decoded once beforehand,
so every way times the same prediction and scoring), its ratio to the full one, the Spearman
correlation of its segm AP50 with the full one's over the configurations, and how many of the
top third by the full validation (the trials ASHA keeps at a reduction factor of 3) it also puts
in its top third.

    python bench/rung_agreement.py [--tiny] [--data DIR] [--configs N] [--epochs E] [--seed S]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import optuna
import pandas as pd
import torch

import common
from cellseg.config import Config, apply_overrides
from cellseg.engine import evaluate
from cellseg.evaluation import coco_max_dets
from cellseg.training import build_training
from search.space import load_space

METRIC = "segm_AP50"


@dataclass(frozen=True)
class Way:
    """One way to validate: at most ``detections`` per image, on ``share`` of the images."""

    name: str
    detections: int | None  # None: the model's own
    share: float


def ways_for(cfg: Config) -> list[Way]:
    full = cfg.model.detections_per_img
    fewer = [d for d in (full // 2, full // 4) if d >= 10]
    return [
        Way("full", None, 1.0),
        *(Way(f"{d} detections", d, 1.0) for d in fewer),
        Way("half the images", None, 0.5),
        *([Way(f"{fewer[0]} detections, half the images", fewer[0], 0.5)] if fewer else []),
    ]


def sample_configs(base: Config, count: int, seed: int) -> list[dict]:
    """``count`` points of the demo space, drawn by Optuna's random sampler."""
    space = load_space(common.TRIALS / "space_demo.yaml", base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space(study.ask()) for _ in range(count)]


def validate(cfg: Config, batches: list, training, way: Way) -> tuple[float, float]:
    """segm AP50 and seconds of one validation ``way``."""
    heads = training.model.roi_heads
    saved = heads.detections_per_img
    detections = way.detections or saved
    heads.detections_per_img = detections
    subset = batches[: max(1, math.ceil(len(batches) * way.share))]
    start = time.perf_counter()
    try:
        metrics = evaluate(
            training.model,
            subset,
            training.device,
            amp=training.amp,
            progress=False,
            max_dets=coco_max_dets(detections),
        )
    finally:
        heads.detections_per_img = saved
    return metrics[METRIC], time.perf_counter() - start


def run_config(cfg: Config, epochs: int) -> dict[str, tuple[float, float]]:
    """Train ``cfg`` for ``epochs``, then validate it every way: {way: (AP50, seconds)}."""
    training = build_training(cfg)
    for epoch in range(1, epochs + 1):
        training.train_epoch(epoch)
    batches = list(training.val_loader)
    return {way.name: validate(cfg, batches, training, way) for way in ways_for(cfg)}


def top_third(values: pd.Series) -> set:
    keep = max(1, len(values) // 3)
    return set(values.sort_values(ascending=False, kind="stable").index[:keep])


def main() -> None:
    p = common.make_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", type=int, help="configurations drawn from the demo space (default 9; 3 with --tiny)"
    )
    p.add_argument("--epochs", type=int, default=1, help="epochs before the rung's validation (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's and the trainings' seed")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the base config")
    args: argparse.Namespace = p.parse_args()
    count = args.configs or (3 if args.tiny else 9)
    torch.set_num_threads(1)  # as a 1-CPU trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with common.dataset_root(args, n_train=12 if args.tiny else 26) as root:
        base = common.bench_config(
            root, tiny=args.tiny, device=args.device, overrides=[f"train.seed={args.seed}", *args.set]
        )
        ap: dict[str, dict[int, float]] = {}
        seconds: dict[str, list[float]] = {}
        for index, point in enumerate(sample_configs(base, count, args.seed)):
            start = time.perf_counter()
            for name, (value, took) in run_config(apply_overrides(base, point), args.epochs).items():
                ap.setdefault(name, {})[index] = value
                seconds.setdefault(name, []).append(took)
            shown = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()
            )
            print(
                f"configuration {index + 1}/{count}: {time.perf_counter() - start:.0f} s  {shown}", flush=True
            )
    table = pd.DataFrame(ap)
    print(
        f"\nsegm AP50 after {args.epochs} epoch(s), one row per configuration:\n{table.round(4).to_string()}"
    )
    full, full_s = table["full"], statistics.median(seconds["full"])
    rows = []
    for name in table.columns:
        rho = table[name].corr(full, method="spearman") if full.nunique() > 1 else float("nan")
        agree = len(top_third(table[name]) & top_third(full))
        rows.append(
            {
                "way": name,
                "s per validation": round(statistics.median(seconds[name]), 3),
                "time / full": round(statistics.median(seconds[name]) / full_s, 2),
                "Spearman with full": round(rho, 2),
                "top third in common": f"{agree}/{max(1, count // 3)}",
            }
        )
    print("\n" + pd.DataFrame(rows).to_string(index=False))
    cheapest = min(rows[1:], key=lambda row: row["time / full"])
    print(f"{common.RATIO_PREFIX}validation time, {cheapest['way']} / full: {cheapest['time / full']:.2f}x")


if __name__ == "__main__":
    main()
