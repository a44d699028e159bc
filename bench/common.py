"""Helpers shared by the benchmark scripts: arguments, data, configs, per-variant subprocesses,
timing and result printing.

The scripts import this module as ``common`` (run them as ``python bench/<name>.py`` so that
``bench/`` is first on ``sys.path``); importing it also puts the checkout on ``sys.path``, since
``search/`` is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import MultiScaleRoIAlign

from cellseg.config import Config, ModelConfig, load_config
from cellseg.data import make_synthetic_dataset, scan_train, split_items
from cellseg.model import build_model
from cellseg.weights import WeightsError, imagenet_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # search/ is not installed: the checkout holds it
TRIALS = REPO / "trials"
RESULT_PREFIX = "BENCH_RESULT "
RATIO_PREFIX = "ratio "

# Synthetic data (realistic profile: crowded images, ids above 255, empty images).
SYNTH_TINY = {"n_train": 6, "n_test": 2, "max_side": 160, "max_cells": 30}
SYNTH_FULL = {"n_train": 20, "n_test": 4, "max_side": 1000, "max_cells": 300}
# --tiny: small inputs and fewer proposals and sampled RoIs (the same for every variant).
TINY_MODEL = [
    "model.min_size=64",
    "model.max_size=128",
    "model.rpn_pre_nms_top_n_train=200",
    "model.rpn_post_nms_top_n_train=100",
    "model.box_batch_size_per_image=64",
]


# ----------------------------------------------------------------------------- arguments


def make_parser(description: str, variants: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The flags every benchmark takes; ``--variant`` (internal) runs one variant and exits."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="small data and model: finishes in well under a minute on 2 CPU cores",
    )
    p.add_argument(
        "--data",
        help="dataset folder in cellseg's layout (default: synthetic data generated into a temp dir)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: trials/demo.yaml sizes; cuda: trials/report_a.yaml settings",
    )
    if variants:
        p.add_argument("--variant", choices=variants, help=argparse.SUPPRESS)
    return p


def child_args(args: argparse.Namespace, root: Path | None) -> list[str]:
    """The common flags to hand to a ``--variant`` subprocess."""
    argv = ["--device", args.device] + (["--tiny"] if args.tiny else [])
    return argv + (["--data", str(root)] if root is not None else [])


# ----------------------------------------------------------------------------- data and config


@contextmanager
def dataset_root(args: argparse.Namespace, **synth: Any) -> Iterator[Path]:
    """``--data`` if given, else a synthetic dataset in a temp dir removed afterwards."""
    if args.data:
        yield Path(args.data).resolve()
        return
    sizes = {**(SYNTH_TINY if args.tiny else SYNTH_FULL), **synth}
    with tempfile.TemporaryDirectory(prefix="cellseg-bench-") as tmp:
        start = time.perf_counter()
        root = make_synthetic_dataset(Path(tmp) / "data", seed=0, **sizes)
        print(f"synthetic data: {sizes} in {time.perf_counter() - start:.1f} s")
        yield root


def bench_config(root: Path | None, *, tiny: bool, device: str, overrides: Sequence[str] = ()) -> Config:
    """trials/demo.yaml on CPU, trials/report_a.yaml on CUDA; --tiny shrinks the input size."""
    if device == "cuda":
        base = TRIALS / "report_a.yaml"
        extra = ["train.device=cuda", *_cuda_weights()]
    else:
        base, extra = TRIALS / "demo.yaml", ["train.device=cpu"]
    if tiny:
        extra += TINY_MODEL
    if root is not None:
        extra.append(f"data.root={root}")
    return load_config(base, [*extra, *overrides])


def _cuda_weights() -> list[str]:
    """report_a's ImageNet backbone (downloaded when absent), else random weights offline.

    Random weights diverge under report_a's SGD at lr 0.005 (NaN by the fifth step on an H200,
    2026-12-04), so they train with Adam at 1e-4 in both loops (each step bounded by the rate).
    """
    try:
        imagenet_file("resnet50")
        return ["model.weights=imagenet"]
    except WeightsError as exc:
        print(f"no ImageNet weights, random ones with Adam at lr 1e-4 instead: {exc}")
        return ["model.weights=none", "optim.name=adam", "optim.lr=1e-4"]


def train_folders(cfg: Config) -> list[Path]:
    """The folders of the training part of cellseg's fixed split, for the plain baseline."""
    train, _ = split_items(scan_train(cfg.data.root), cfg.data.val_fraction, cfg.data.split_seed)
    return [item.folder for item in train]


def torchvision_model(cfg: ModelConfig) -> torch.nn.Module:
    """The same Mask R-CNN as torchvision runs it: NCHW layout and torchvision's RoIAlign."""
    model = build_model(dataclasses.replace(cfg, channels_last=False))
    heads = model.roi_heads
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(heads, name)
        setattr(heads, name, MultiScaleRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio))
    return model


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so that wall times include it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class TimedLoader:
    """Iterates a loader, timing everything after the first ``skip`` batches (the warm-up).

    The clock runs from the request of the first counted batch to the request that ends the
    epoch, so it covers both data loading and the consumer's steps; it accumulates over epochs.
    ``wait_seconds`` is the part of it spent waiting for the next batch (decode and augmentation
    when the loader has no workers).
    """

    def __init__(self, loader: Iterable, *, skip: int = 1, device: str | torch.device = "cpu") -> None:
        self.loader, self.skip, self.device = loader, skip, device
        self.batches = self.images = 0
        self.seconds = 0.0
        self.wait_seconds = 0.0  # of ``seconds``: waiting for the next batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        start = None
        batches = iter(self.loader)
        while True:
            if start is None and self.batches >= self.skip:
                synchronize(self.device)
                start = time.perf_counter()
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            if self.batches >= self.skip:
                self.images += len(batch[0])
                self.wait_seconds += time.perf_counter() - asked
            self.batches += 1
            yield batch
        if start is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - start

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


@contextmanager
def timed_calls(
    module: Any, names: Sequence[str], totals: dict[str, float], results: dict[str, list] | None = None
) -> Iterator[None]:
    """Patch ``module.<name>`` for each name to add its wall time to ``totals[name]``
    (and append what it returns to ``results[name]``), restoring the originals afterwards."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, fn: Callable) -> Callable:
        def timed(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            out = fn(*a, **kw)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            if results is not None:
                results.setdefault(name, []).append(out)
            return out

        return timed

    try:
        for name, fn in originals.items():
            setattr(module, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


# ----------------------------------------------------------------------------- memory and subprocesses


def peak_memory() -> dict[str, float | None]:
    """This process's peak RSS in MiB, and peak CUDA memory allocated (None without CUDA)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    return {"peak_rss_mb": rss, "peak_cuda_mb": cuda}


def emit_result(result: dict[str, Any]) -> None:
    """Hand a variant's result to the parent (one JSON line on stdout)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_variant(script: str | Path, argv: Sequence[str]) -> dict[str, Any]:
    """Run ``script argv`` in a fresh Python process (clean peak RSS) and return its result.

    The child's stderr passes through; its stdout is searched for the ``emit_result`` line.
    """
    [result] = run_variants(script, [argv])
    return result


def run_variants(script: str | Path, argvs: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """Run ``script`` once per argument list, all at the same time, each in a fresh process;
    their results in the same order (as ``run_variant``)."""
    procs = [
        subprocess.Popen([sys.executable, str(script), *argv], cwd=REPO, text=True, stdout=subprocess.PIPE)
        for argv in argvs
    ]
    with ThreadPoolExecutor(len(procs)) as pool:  # read every stdout at once: no full pipe
        outputs = [out for out, _ in pool.map(lambda proc: proc.communicate(), procs)]
    results = []
    for argv, proc, out in zip(argvs, procs, outputs):
        what = f"{Path(script).name} {' '.join(argv)}"
        if proc.returncode != 0:
            sys.stdout.write(out)
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
        if not lines:
            raise RuntimeError(f"{what} printed no result line")
        results.append(json.loads(lines[-1][len(RESULT_PREFIX) :]))
    return results


# ----------------------------------------------------------------------------- a trial without a model

BEST_FINAL = 0.76  # final_value's maximum


def final_value(config: dict[str, Any]) -> float:
    """The value a trivial trial of the demo space's ``config`` approaches (at most ``BEST_FINAL``:
    learning rate 10**-2.5, resnet34, adamw, colour jitter 0.3)."""
    lr = float(config.get("optim.lr", 1e-3))
    final = 0.7 - 0.06 * (math.log10(lr) + 2.5) ** 2 + 0.03 * (config.get("model.backbone") == "resnet34")
    final += {"adam": 0.02, "adamw": 0.03}.get(str(config.get("optim.name")), 0.0)
    return final - 0.05 * abs(float(config.get("augment.color_jitter_p", 0.3)) - 0.3)


def epoch_value(final: float, epoch: int, rng: random.Random) -> float:
    """A trivial trial's metric at ``epoch``: approaching ``final``, with noise from ``rng``."""
    return min(max(final * (1 - math.exp(-epoch / 5)) + rng.gauss(0, 0.01), 0.0), 1.0)


# ----------------------------------------------------------------------------- printing


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned text table."""
    cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def print_ratio(label: str, value: float, unit: str = "x") -> None:
    """The line the smoke test looks for: ``ratio <label>: <value><unit>``."""
    text = f"{value:+.1f} %" if unit == "%+" else f"{value:.1f} %" if unit == "%" else f"{value:.2f}x"
    print(f"{RATIO_PREFIX}{label}: {text}")


def machine() -> str:
    """One line describing where the benchmark ran."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {gpu}, {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
