"""Cheaper validation at ASHA's rungs: does it decide as the full validation does?

``--configs`` configurations are drawn at random (seeded) from the demo space on the demo config;
each trains the rung's epochs (``--epochs``, 1 by default: ASHA's first rung in the demo search)
with one thread, as a trial does (one that diverges is left out, as the search records it failed).
Then the model is validated the full way (every validation image, ``model.detections_per_img``
detections each, predicted in float32) and the cheaper ways: fewer detections per image, half of
the validation batches (rounded up), both, and (where ``train.amp`` computes in bf16) every image
predicted in bf16 (``train.amp_validation``), in an order rotated from one configuration to the
next. For each way: seconds per validation (median over the configurations; the validation
images are decoded once beforehand, so every way times the same prediction and scoring), its
ratio to the full one, the Spearman correlation of its segm AP50 with the full one's, and how
many of ASHA's decisions it would take as the full validation does: ASHA (reduction factor 3)
keeps a trial unless its metric is below the 2/3 quantile of the rung's metrics (here those of
every configuration at once; ASHA uses those recorded before the trial), so a rung where most
trials score 0 keeps them all.

    python bench/rung_agreement.py [--tiny] [--data DIR] [--configs N] [--epochs E] [--seed S]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd
import torch

import common
from cellseg.config import Config, apply_overrides
from cellseg.engine import NonFiniteLossError, evaluate
from cellseg.evaluation import coco_max_dets
from cellseg.precision import validation_amp
from cellseg.training import Training, build_training, resolve_device
from search.run import build_parser
from search.space import load_space

METRIC = "segm_AP50"
REDUCTION_FACTOR = build_parser().get_default("reduction_factor")  # the search's default


@dataclass(frozen=True)
class Way:
    """One way to validate: at most ``detections`` per image, on ``share`` of the images,
    predicting in bf16 with ``bf16`` (``train.amp_validation``)."""

    name: str
    detections: int | None  # None: the model's own
    share: float
    bf16: bool = False


def ways_for(cfg: Config) -> list[Way]:
    full = cfg.model.detections_per_img
    fewer = [d for d in (full // 2, full // 4) if d >= 10]
    bf16 = validation_amp(
        dataclasses.replace(cfg.train, amp_validation=True), resolve_device(cfg.train.device)
    )
    return [
        Way("full", None, 1.0),
        *(Way(f"{d} detections", d, 1.0) for d in fewer),
        Way("half the batches", None, 0.5),
        *([Way(f"{fewer[0]} detections, half the batches", fewer[0], 0.5)] if fewer else []),
        *([Way("bf16 predictions", None, 1.0, bf16=True)] if bf16 else []),
    ]


def sample_configs(base: Config, count: int, seed: int) -> list[dict]:
    """``count`` points of the demo space, drawn by Optuna's random sampler."""
    space = load_space(common.TRIALS / "space_demo.yaml", base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space(study.ask()) for _ in range(count)]


def validate(batches: list, training: Training, way: Way) -> tuple[float, float]:
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
            predict_amp=way.bf16,
            progress=False,
            max_dets=coco_max_dets(detections),
        )
    finally:
        heads.detections_per_img = saved
    return metrics[METRIC], time.perf_counter() - start


def run_config(cfg: Config, epochs: int, rotate: int) -> dict[str, tuple[float, float]]:
    """Train ``cfg`` for ``epochs``, then validate it every way, the ways' order rotated by
    ``rotate``: {way: (AP50, seconds)}."""
    training = build_training(cfg)
    for epoch in range(1, epochs + 1):
        training.train_epoch(epoch)
    batches = list(training.val_loader)
    ways = ways_for(cfg)
    turn = rotate % len(ways)
    return {way.name: validate(batches, training, way) for way in ways[turn:] + ways[:turn]}


def asha_keeps(values: pd.Series) -> pd.Series:
    """Which trials ASHA keeps at a rung with these metrics (the search's default reduction factor,
    3): those not below the 2/3 quantile (Ray's ``ASHAScheduler`` stops a trial only strictly below it)."""
    return values >= np.nanpercentile(values, (1 - 1 / REDUCTION_FACTOR) * 100)


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
            try:
                validated = run_config(apply_overrides(base, point), args.epochs, rotate=index)
            except NonFiniteLossError as exc:
                print(f"configuration {index + 1}/{count}: left out, it diverged ({exc})", flush=True)
                continue
            for name, (value, took) in validated.items():
                ap.setdefault(name, {})[index] = value
                seconds.setdefault(name, []).append(took)
            shown = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()
            )
            print(
                f"configuration {index + 1}/{count}: {time.perf_counter() - start:.0f} s  {shown}", flush=True
            )
    if not ap:
        raise SystemExit("every configuration diverged: nothing to compare")
    table = pd.DataFrame(ap)[[way.name for way in ways_for(base)]]
    print(
        f"\nsegm AP50 after {args.epochs} epoch(s), one row per configuration:\n{table.round(4).to_string()}"
    )
    full, full_s = table["full"], statistics.median(seconds["full"])
    rows = []
    for name in table.columns:
        rho = table[name].corr(full, method="spearman") if full.nunique() > 1 else float("nan")
        agree = int((asha_keeps(table[name]) == asha_keeps(full)).sum())
        rows.append(
            {
                "way": name,
                "s per validation": round(statistics.median(seconds[name]), 3),
                "time / full": round(statistics.median(seconds[name]) / full_s, 2),
                "Spearman with full": round(rho, 2),
                "ASHA decisions as full": f"{agree}/{len(full)}",
            }
        )
    print("\n" + pd.DataFrame(rows).to_string(index=False))
    cheapest = min(rows[1:], key=lambda row: row["time / full"])
    print(f"{common.RATIO_PREFIX}validation time, {cheapest['way']} / full: {cheapest['time / full']:.2f}x")


if __name__ == "__main__":
    main()
