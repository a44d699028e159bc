"""Training throughput and peak memory: cellseg's loop against a plain torchvision-style loop.

cellseg: ``build_loaders`` (cached decode, label maps, vectorised targets) + ``train_one_epoch``
(schedule, clipping, AMP on CUDA and on a CPU with bf16 arithmetic), cellseg's model
(channels-last layout, cellseg's CPU RoIAlign).
plain: ``bench/plain.py`` (decode every time, one mask per instance by a Python loop, no AMP) and
the same model as torchvision runs it (NCHW, torchvision's RoIAlign), and the optimizer the config
names in torch's default implementation (cellseg's is the fused one). Same model config, weights
seed, training images, batch size, epochs and optimizer settings; the first step is warm-up and not timed. Each variant runs in a fresh
process so that its peak RSS is its own.

    python bench/train_throughput.py [--tiny] [--data DIR] [--device cuda] [--epochs N]
        [--loader-workers N] [--set key=value ...] [--against key=value ...]

``--against`` adds a third loop, cellseg's with these overrides too (e.g.
``data.batch_by_orientation=false``), as the baseline of one cellseg setting, run in the same
invocation, with its own ratio.

``--loader-workers N`` sets cellseg's ``data.num_workers`` (default: the preset's, 0); the cellseg
variant also reports ``wait_seconds``, the timed part spent waiting for the next batch (decode and
augmentation at 0 workers; with CUDA it may overlap the previous step's queued GPU work).
"""

from __future__ import annotations

import argparse

import torch
from plain import plain_loader, plain_train_epoch

import common
from cellseg.optim import OPTIMIZERS, optimizer_settings
from cellseg.training import build_training, seed_everything

VARIANTS = ("cellseg", "plain")
AGAINST = "against"  # cellseg's loop with the --against overrides


def run_cellseg(args: argparse.Namespace) -> dict[str, float]:
    workers = [] if args.loader_workers is None else [f"data.num_workers={args.loader_workers}"]
    against = args.against if args.variant == AGAINST else []
    cfg = common.bench_config(
        args.data,
        tiny=args.tiny,
        device=args.device,
        overrides=[f"train.epochs={args.epochs}", *workers, *args.set, *against],
    )
    s = build_training(cfg)
    timed = common.TimedLoader(s.train_loader, device=s.device)
    for epoch in range(1, args.epochs + 1):
        s.train_epoch(epoch, loader=timed)
    return {
        "images": timed.images,
        "seconds": timed.seconds,
        "wait_seconds": timed.wait_seconds,
        "loader_workers": cfg.data.num_workers,
        **common.peak_memory(),
    }


def run_plain(args: argparse.Namespace) -> dict[str, float]:
    cfg = common.bench_config(args.data, tiny=args.tiny, device=args.device, overrides=args.set)
    device = torch.device(args.device)
    seed_everything(cfg.train.seed)
    model = common.torchvision_model(cfg.model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    settings = optimizer_settings(cfg.optim)
    optimizer = OPTIMIZERS[cfg.optim.name](params, **settings)  # torch's default implementation
    loader = plain_loader(
        common.train_folders(cfg),
        cfg.train.batch_size,
        hflip_p=cfg.augment.hflip_p,
        vflip_p=cfg.augment.vflip_p,
        seed=cfg.train.seed,
    )
    timed = common.TimedLoader(loader, device=device)
    for _ in range(args.epochs):
        plain_train_epoch(model, optimizer, timed, device)
    return {"images": timed.images, "seconds": timed.seconds, **common.peak_memory()}


def main() -> None:
    parser = common.make_parser(__doc__.splitlines()[0], (*VARIANTS, AGAINST))
    parser.add_argument("--epochs", type=int, help="epochs per variant (default 2)")
    parser.add_argument(
        "--loader-workers", type=int, help="cellseg's data.num_workers (default: the preset's)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both loops, e.g. model.backbone=resnet34 (repeatable)",
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also run cellseg's loop with this override as a baseline, e.g. "
        "data.batch_by_orientation=false (repeatable)",
    )
    args = parser.parse_args()
    args.epochs = args.epochs or 2
    if args.variant:
        common.emit_result((run_plain if args.variant == "plain" else run_cellseg)(args))
        return
    print(common.machine())
    with common.dataset_root(args) as root:
        argv = common.child_args(args, root) + ["--epochs", str(args.epochs)]
        if args.loader_workers is not None:
            argv += ["--loader-workers", str(args.loader_workers)]
        argv += [flag for override in args.set for flag in ("--set", override)]
        argv += [flag for override in args.against for flag in ("--against", override)]
        variants = (*VARIANTS, AGAINST) if args.against else VARIANTS
        results = {v: common.run_variant(__file__, [*argv, "--variant", v]) for v in variants}
        cfg = common.bench_config(root, tiny=args.tiny, device=args.device, overrides=args.set)
    print(
        f"model {cfg.model.backbone} min/max size {cfg.model.min_size}/{cfg.model.max_size}, "
        f"batch {cfg.train.batch_size}, {args.epochs} epochs, first step not timed"
    )
    rows = [
        [v, r["images"], r["seconds"], r["images"] / r["seconds"], r["peak_rss_mb"], r["peak_cuda_mb"]]
        for v, r in results.items()
    ]
    common.print_table(["loop", "images", "seconds", "images/s", "peak RSS MiB", "peak CUDA MiB"], rows)
    c, p = results["cellseg"], results["plain"]
    common.print_ratio("peak RSS cellseg/plain", c["peak_rss_mb"] / p["peak_rss_mb"])
    common.print_ratio("images/s cellseg/plain", (c["images"] / c["seconds"]) / (p["images"] / p["seconds"]))
    if args.against:
        a, what = results[AGAINST], " ".join(args.against)
        common.print_ratio(f"seconds cellseg/cellseg with {what}", c["seconds"] / a["seconds"])
        common.print_ratio(f"peak RSS cellseg/cellseg with {what}", c["peak_rss_mb"] / a["peak_rss_mb"])


if __name__ == "__main__":
    main()
