"""The training data path alone, augmentation on: cellseg's CellDataset against the plain dataset.

cellseg: the train loader of ``cellseg.training.build_loaders`` (CellDataset with
``cache_decoded`` on, ``build_augment`` of the config, label maps, vectorised targets). plain:
``bench/plain.py``'s decode-every-time dataset with the config's flip probabilities. Both iterate
the same training images for several epochs (the cache fills in epoch 1), each in a fresh process.

    python bench/data_loading.py [--tiny] [--data DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import time

import torch
from plain import plain_loader

import common
from cellseg.training import build_loaders, seed_everything

VARIANTS = ("cellseg", "plain")


def run_child(args: argparse.Namespace) -> dict[str, object]:
    cfg = common.bench_config(args.data, tiny=args.tiny, device="cpu", overrides=["data.cache_decoded=true"])
    seed_everything(cfg.train.seed)
    if args.variant == "cellseg":
        loader, _, _ = build_loaders(cfg, torch.device("cpu"))
    else:
        loader = plain_loader(
            common.train_folders(cfg),
            cfg.train.batch_size,
            hflip_p=cfg.augment.hflip_p,
            vflip_p=cfg.augment.vflip_p,
            seed=cfg.train.seed,
        )
    per_epoch = []
    for epoch in range(1, args.epochs + 1):
        if args.variant == "cellseg":
            loader.dataset.set_epoch(epoch)
        images, start = 0, time.perf_counter()
        for batch_images, _ in loader:
            images += len(batch_images)
        per_epoch.append((images, time.perf_counter() - start))
    return {"per_epoch": per_epoch, **common.peak_memory()}


def main() -> None:
    parser = common.make_parser(__doc__.splitlines()[0], VARIANTS)
    parser.add_argument("--epochs", type=int, help="epochs per variant (default 2 tiny, 3 else)")
    args = parser.parse_args()
    args.epochs = args.epochs or (2 if args.tiny else 3)
    if args.device != "cpu":
        parser.error("the data path runs on the CPU; --device does not apply")
    if args.variant:
        common.emit_result(run_child(args))
        return
    print(common.machine())
    with common.dataset_root(args) as root:
        argv = common.child_args(args, root) + ["--epochs", str(args.epochs)]
        results = {v: common.run_variant(__file__, [*argv, "--variant", v]) for v in VARIANTS}
        augment = common.bench_config(root, tiny=args.tiny, device="cpu").augment
    active = {k: v for k, v in vars(augment).items() if k.endswith("_p") and v > 0}
    print(f"augmentation {active} (plain: flips only), {args.epochs} epochs")
    rows, speed = [], {}
    for v, r in results.items():
        epochs = r["per_epoch"]
        speed[v] = sum(n for n, _ in epochs) / sum(s for _, s in epochs)
        rows.append([v, *(n / s for n, s in epochs), speed[v], r["peak_rss_mb"]])
    header = [
        "dataset",
        *(f"epoch {e} images/s" for e in range(1, args.epochs + 1)),
        "all images/s",
        "peak RSS MiB",
    ]
    common.print_table(header, rows)
    common.print_ratio("images/s cellseg/plain", speed["cellseg"] / speed["plain"])


if __name__ == "__main__":
    main()
