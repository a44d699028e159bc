"""Checkpoint writes: a trial's ``last.pt`` (model and Adam's state) through ``save_checkpoint``
against the same atomic write with ``torch.save``'s default per-record CRC-32 (the baseline).

For each backbone of the demo space the model of ``trials/demo.yaml`` is built, Adam takes one
step (so its state is the size a trial's is), and the state is written ``--rounds`` times each
way, alternated, into a temp folder on the disk a trial's scratch uses; median seconds per write.
No data is read.

    python bench/checkpoint_save.py [--tiny] [--rounds R]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

import common
from cellseg.atomic_file import write_atomic
from cellseg.checkpoint import make_state, save_checkpoint
from cellseg.model import build_model
from cellseg.optim import build_optimizer


def adam_state(backbone: str, tiny: bool) -> dict:
    """What a demo trial with ``backbone`` and Adam writes to last.pt after an epoch."""
    cfg = common.bench_config(
        None, tiny=tiny, device="cpu", overrides=[f"model.backbone={backbone}", "optim.name=adam"]
    )
    model = build_model(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return make_state(
        cfg, model, epoch=1, metrics={}, optimizer=optimizer.state_dict(), torch_rng=torch.get_rng_state()
    )


def baseline_save(path: Path, state: dict) -> None:
    """The same atomic write with torch.save's defaults (a CRC-32 per record)."""
    write_atomic(path, lambda file: torch.save(state, file))


def main() -> None:
    p = common.make_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--rounds", type=int, default=None, help="writes per way and backbone (default 7; 3 with --tiny)"
    )
    args = p.parse_args()
    rounds = args.rounds or (3 if args.tiny else 7)
    torch.set_num_threads(1)  # as a 1-CPU trial
    for backbone in ("resnet18",) if args.tiny else ("resnet18", "resnet34"):
        state = adam_state(backbone, args.tiny)
        seconds: dict[str, list[float]] = {"torch.save default": [], "save_checkpoint": []}
        with tempfile.TemporaryDirectory(prefix="cellseg-ckpt-") as folder:
            path = Path(folder) / "last.pt"
            for _ in range(rounds):
                for name, save in (
                    ("torch.save default", baseline_save),
                    ("save_checkpoint", save_checkpoint),
                ):
                    start = time.perf_counter()
                    save(path, state)
                    seconds[name].append(time.perf_counter() - start)
            size = path.stat().st_size / 1e6
        base, ours = (statistics.median(v) for v in seconds.values())
        print(f"{backbone} + Adam, last.pt {size:.0f} MB, median of {rounds} writes each:")
        for name, values in seconds.items():
            print(
                f"  {name:<20} {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"
            )
        print(f"{common.RATIO_PREFIX}save_checkpoint / torch.save default, {backbone}: {ours / base:.2f}x")


if __name__ == "__main__":
    main()
