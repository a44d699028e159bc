"""Mixed precision: the same training in float32 and with ``train.amp`` (bf16), seconds and AP50.

For each seed, ``fit`` runs the config twice at the same time, each in its own process with
``--threads`` threads (one, as a search's 1-CPU trial runs), once with ``train.amp=false`` and once
with ``train.amp=true``: training and validation seconds per epoch and validation segm AP50 per
epoch. On a CPU without bf16 arithmetic ``train.amp`` trains in float32 (the script says so).
The demo config by default; on a GPU (``--device cuda``) trials/report_a.yaml.

    python bench/mixed_precision.py [--tiny] [--data DIR] [--device cuda] [--epochs N]
        [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

import common
from cellseg.precision import mixed_precision
from cellseg.training import TRAIN_SECONDS, VAL_SECONDS, fit

VARIANTS = ("float32", "amp")


def run_one(args: argparse.Namespace) -> dict:
    """One ``fit`` of the variant: seconds and segm AP50 per epoch."""
    torch.set_num_threads(args.threads)
    overrides = [
        f"train.amp={str(args.variant == 'amp').lower()}",
        "train.amp_validation=false",  # the training steps' precision alone
        f"train.seed={args.seed}",
        *([f"train.epochs={args.epochs}"] if args.epochs else []),
    ]
    cfg = common.bench_config(args.data, tiny=args.tiny, device=args.device, overrides=overrides)
    with tempfile.TemporaryDirectory(prefix="cellseg-amp-") as run_dir:
        result = fit(cfg, run_dir=run_dir, progress=False)
    return {
        "train_s": [h[TRAIN_SECONDS] for h in result.history],
        "val_s": [h[VAL_SECONDS] for h in result.history],
        "ap50": [h["segm_AP50"] for h in result.history],
    }


def main() -> None:
    parser = common.make_parser(__doc__.splitlines()[0], VARIANTS)
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny and args.epochs is None:
        args.epochs = 1
    if args.variant:
        common.emit_result(run_one(args))
        return
    print(common.machine())
    device = torch.device(args.device)
    if not mixed_precision(device):
        amp_precision = "float32 (no bf16 arithmetic)"
    else:
        amp_precision = "float16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"
    with common.dataset_root(args) as root:
        argv = [*common.child_args(args, root), "--threads", str(args.threads)]
        argv += ["--epochs", str(args.epochs)] if args.epochs else []

        def pair(seed: int) -> dict[str, dict]:
            """Both variants of ``seed``, run at the same time."""
            argvs = [[*argv, "--seed", str(seed), "--variant", v] for v in VARIANTS]
            return dict(zip(VARIANTS, common.run_variants(__file__, argvs)))

        runs = {seed: pair(seed) for seed in args.seeds}
        cfg = common.bench_config(root, tiny=args.tiny, device=args.device)
    print(
        f"config {cfg.model.backbone} min/max size {cfg.model.min_size}/{cfg.model.max_size}, "
        f"{len(runs[args.seeds[0]]['amp']['ap50'])} epochs, {args.threads} thread(s) per run, "
        f"float32 and amp side by side; train.amp here: {amp_precision}"
    )
    rows = [
        [
            seed,
            variant,
            statistics.median(r["train_s"]),
            statistics.median(r["val_s"]),
            r["ap50"][-1],
            max(r["ap50"]),
        ]
        for seed, pair in runs.items()
        for variant, r in pair.items()
    ]
    common.print_table(["seed", "precision", "train s/epoch", "val s/epoch", "AP50 last", "AP50 best"], rows)

    def total(variant: str, key: str) -> float:
        return sum(sum(pair[variant][key]) for pair in runs.values())

    def mean_last(variant: str) -> float:
        return statistics.mean(pair[variant]["ap50"][-1] for pair in runs.values())

    print(f"mean last-epoch AP50: float32 {mean_last('float32'):.4f}, amp {mean_last('amp'):.4f}")
    common.print_ratio("training seconds amp/float32", total("amp", "train_s") / total("float32", "train_s"))
    common.print_ratio(
        "training + validation seconds amp/float32",
        (total("amp", "train_s") + total("amp", "val_s"))
        / (total("float32", "train_s") + total("float32", "val_s")),
    )


if __name__ == "__main__":
    main()
