"""The mask predictor's upsampling: ``cellseg.mask_upsample.MaskUpsample`` against torch's
``ConvTranspose2d`` (the baseline), one thread, as a CPU trial trains.

Two parts, each alternating which way goes first: the layer alone, forward and backward on
channels-last regions of the mask head (14x14, under ``train.amp``'s autocast where this CPU
computes bf16), median seconds; then training epochs of the demo model (``trials/demo.yaml``
with ``--set``; by default what ``make search`` trains most: the 256-channel mask head with norm
and Adam), each step's forward and backward pass run both ways on the same batch and the same
sampled regions before its optimizer step, seconds per epoch. ``ratio`` lines are
MaskUpsample / torch.

    python bench/mask_upsample.py [--tiny] [--data DIR] [--epochs N] [--rounds R] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import common
from cellseg.mask_upsample import MaskUpsample
from cellseg.precision import autocast, mixed_precision
from cellseg.training import build_training

SEARCHED_MOST = ["model.mask_head_channels=256", "model.mask_head_norm=true", "optim.name=adam"]


def timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def layer_step(layer: nn.Module, x: torch.Tensor, amp: bool) -> Callable[[], object]:
    """One forward and backward pass of ``layer`` on a copy of ``x``, as in a training step."""

    def step() -> None:
        inputs = x.detach().requires_grad_(True)
        with autocast(torch.device("cpu"), amp):
            y = layer(inputs)
        y.backward(torch.ones_like(y))

    return step


def bench_layer(rounds: int, amp: bool, tiny: bool) -> None:
    print(f"the layer, forward and backward, {'bf16' if amp else 'float32'}, median of {rounds}:")
    for channels, regions in [(128, 32)] if tiny else [(128, 64), (256, 32), (256, 64)]:
        conv = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        ways = {"torch": conv, "MaskUpsample": MaskUpsample.of(conv)}
        x = torch.randn(regions, channels, 14, 14).contiguous(memory_format=torch.channels_last)
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(rounds):
            for name in list(ways)[:: 1 if r % 2 else -1]:
                seconds[name].append(timed(layer_step(ways[name], x, amp)))
        base, ours = (statistics.median(s) for s in seconds.values())
        print(
            f"  {channels} channels, {regions} regions: torch {1e3 * base:.1f} ms, MaskUpsample {1e3 * ours:.1f} ms"
        )
        common.print_ratio(f"layer, {channels} channels, {regions} regions", ours / base)


def bench_training(args: argparse.Namespace, root: Path) -> None:
    """Each batch's forward and backward pass both ways on the same model, the same sampled
    regions (the random state restored), then one optimizer step: the same work but the layer."""
    overrides = [f"train.epochs={args.epochs}", *SEARCHED_MOST, *args.set]
    cfg = common.bench_config(root, tiny=args.tiny, device="cpu", overrides=overrides)
    t = build_training(cfg)
    predictor = t.model.roi_heads.mask_predictor
    upsample = predictor.conv5_mask
    conv = nn.ConvTranspose2d(upsample.in_channels, upsample.out_channels, 2, stride=2)
    conv.weight, conv.bias = upsample.weight, upsample.bias
    ways = {"torch": conv, "MaskUpsample": upsample}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    t.model.train()
    for epoch in range(1, args.epochs + 1):
        t.start_epoch(epoch)
        for name in ways:
            seconds[name].append(0.0)
        for step, (images, targets) in enumerate(t.train_loader):
            rng = torch.get_rng_state()
            for name in list(ways)[:: 1 if step % 2 else -1]:
                predictor.conv5_mask = ways[name]
                torch.set_rng_state(rng)
                t.optimizer.zero_grad(set_to_none=True)
                start = time.perf_counter()
                with autocast(t.device, t.amp):
                    loss = sum(t.model(images, targets).values())
                loss.backward()
                seconds[name][-1] += time.perf_counter() - start
            t.optimizer.step()
    print(
        f"training steps' forward and backward passes, {cfg.model.backbone}, mask head "
        f"{cfg.model.mask_head_channels}, {cfg.optim.name}, per epoch:"
    )
    for name, values in seconds.items():
        print(f"  {name:<13} " + " ".join(f"{s:.2f}" for s in values) + f" s, total {sum(values):.1f} s")
    base, ours = sum(seconds["torch"]), sum(seconds["MaskUpsample"])
    print(f"  saved {(base - ours) / args.epochs:.2f} s per epoch")
    common.print_ratio("training forward and backward seconds", ours / base)


def main() -> None:
    p = common.make_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs per way (default 4; 1 with --tiny)"
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="layer rounds per way (default 15; 3 with --tiny)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = p.parse_args()
    if args.device != "cpu":
        p.error("MaskUpsample changes only the CPU's training steps: --device cpu")
    args.epochs = args.epochs or (1 if args.tiny else 4)
    torch.set_num_threads(1)  # as a 1-CPU trial
    print(common.machine())
    bench_layer(args.rounds or (3 if args.tiny else 15), mixed_precision(torch.device("cpu")), args.tiny)
    with common.dataset_root(args) as root:
        bench_training(args, root)


if __name__ == "__main__":
    main()
