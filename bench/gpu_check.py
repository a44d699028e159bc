"""The GPU check: one table of what only a CUDA machine can measure (docs/performance.md).

    bash bench/gpu_check.sh pack   # on the development machine: wheels + the real slice
    bash bench/gpu_check.sh        # on the CUDA machine: this script on the real slice

Rows, each measured in its own process (so its peak GPU memory is its own):
- report B's preset (random weights: the GPU machine has no network) trained on the real slice
  for --epochs epochs in bf16 and in float32: segm AP50 per epoch, seconds per epoch, peak memory;
- cellseg's training loop against the plain loop (bench/train_throughput.py, report A's preset);
- 2, 4 and 8 trainings sharing the GPU at once (``--pack``), as ``--gpus-per-trial`` 0.5, 0.25
  and 0.125 pack trials, against one alone (the same training as the row above);
- the export of the largest test image with the bf16 run's best checkpoint.

``--loader-workers N`` gives the cellseg trainings of the last two (one alone and packed) N
DataLoader workers (``data.num_workers``; report A's preset has 0), as search trials have
(trials/base.yaml: 4); ``--only pack`` measures just those (no report-B, plain or export rows),
``--only train`` just the report-B rows. Report B's seconds per epoch are split into training and
validation (the rest is the epoch's set-up, checkpoints and report); the cellseg rows show the
share of their timed seconds spent waiting for the next batch.

``--repack SRC --out DST`` (used by ``gpu_check.sh pack``) rewrites the real slice's LZW images
as zlib TIFFs, which tifffile decodes without imagecodecs (too large to carry), and checks that
every image and mask reads back identical.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

import common
from cellseg.checkpoint import BEST, load_checkpoint, restore_model
from cellseg.config import load_config
from cellseg.data import load_test_images, read_image
from cellseg.export import export_predictions, write_submission
from cellseg.training import TRAIN_SECONDS, VAL_SECONDS, fit

BENCH = Path(__file__).resolve().parent
VARIANTS = ("train", "export")


def repack(src: Path, out: Path) -> None:
    """The real slice with zlib instead of LZW TIFFs (same pixels), as a .tgz at ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(src) as archive:
            archive.extractall(tmp, filter="data")
        for path in sorted(Path(tmp).rglob("*.tif")):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                array, photometric = page.asarray(), page.photometric
            before = read_image(path) if array.ndim == 3 else array
            tifffile.imwrite(
                path,
                array,
                photometric=photometric,
                compression="zlib",
                compressionargs={"level": 9},
                predictor=array.dtype == np.uint8,
                extrasamples=()
                if array.ndim == 2 or array.shape[2] <= 3
                else ("unspecified",) * (array.shape[2] - 3),
            )
            after = read_image(path) if array.ndim == 3 else tifffile.imread(path)
            if not np.array_equal(before, after):
                raise RuntimeError(f"{path}: re-encoding changed the pixels")
        with tarfile.open(out, "w:gz") as archive:
            for top in Path(tmp).iterdir():
                archive.add(top, arcname=top.name)


def train_variant(args: argparse.Namespace) -> dict:
    """fit() with report B's preset; per-epoch AP50 and seconds (all, training and validation:
    the rest is set-up, checkpoints and reports), peak GPU memory."""
    cfg = load_config(
        common.TRIALS / "report_b.yaml",
        [
            f"data.root={args.data}",
            f"train.device={args.device}",
            "model.weights=none",
            f"train.epochs={args.epochs}",
            f"train.amp={str(args.amp).lower()}",
            "data.num_workers=4",
            *(common.TINY_MODEL if args.tiny else ()),
        ],
    )
    stamps = [time.perf_counter()]

    def report(metrics: dict[str, float], run_dir: Path) -> None:
        common.synchronize(args.device)
        stamps.append(time.perf_counter())

    result = fit(cfg, run_dir=args.run_dir, report=report, progress=False)
    return {
        "ap50": [h["segm_AP50"] for h in result.history],
        "epoch_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "train_s": [h[TRAIN_SECONDS] for h in result.history],
        "val_s": [h[VAL_SECONDS] for h in result.history],
        **common.peak_memory(),
    }


def export_variant(args: argparse.Namespace) -> dict:
    """The largest test image predicted and written as a checked submission."""
    state = load_checkpoint(Path(args.run_dir) / BEST)
    model, cfg = restore_model(state, args.device)
    largest = max(load_test_images(args.data), key=lambda t: t.height * t.width)
    common.synchronize(args.device)
    start = time.perf_counter()
    results = export_predictions(
        [model],
        [largest],
        read_image,
        device=args.device,
        score_threshold=cfg.model.box_score_thresh,
        progress=False,
    )
    common.synchronize(args.device)
    seconds = time.perf_counter() - start
    write_submission(results, [largest], Path(args.run_dir) / "largest.json")
    return {
        "image": f"{largest.height}x{largest.width}",
        "detections": len(results),
        "seconds": seconds,
        **common.peak_memory(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the real slice (folder with train/ and the test mapping)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each report-B run")
    parser.add_argument("--repack", type=Path, help="hw3-dev.tgz to rewrite with zlib TIFFs")
    parser.add_argument("--out", type=Path, help="where --repack writes its .tgz")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu with --tiny: a quick run of the steps on any machine",
    )
    parser.add_argument("--tiny", action="store_true", help="small inputs (common.TINY_MODEL)")
    parser.add_argument(
        "--pack",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[2, 4, 8],
        help="how many trainings share the GPU at once, one row each (default 2,4,8)",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        help="data.num_workers of the cellseg trainings, one alone and packed (default: 0, report A's)",
    )
    parser.add_argument(
        "--only",
        choices=("pack", "train"),
        help="pack: only one cellseg training alone and the --pack rows; train: only report B's",
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repack:
        repack(args.repack, args.out)
        return
    if args.variant:
        common.emit_result((train_variant if args.variant == "train" else export_variant)(args))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    print(common.machine())
    data = str(Path(args.data).resolve())
    runs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    start = time.perf_counter()
    rows: list[list] = []

    def add(row: list) -> None:
        """Keep a row and print it at once, so that a run cut short still shows what it measured."""
        rows.append(row)
        print("row:", json.dumps(row), flush=True)

    same = ["--data", data, "--device", args.device, *(["--tiny"] if args.tiny else [])]
    for amp in () if args.only == "pack" else (True, False):
        run_dir = runs / ("bf16" if amp else "float32")
        r = common.run_variant(
            __file__,
            [
                "--variant",
                "train",
                *same,
                "--epochs",
                str(args.epochs),
                "--amp" if amp else "--no-amp",
                "--run-dir",
                str(run_dir),
            ],
        )
        add(
            [
                f"report B, {run_dir.name}, {args.epochs} epochs",
                "AP50 " + " ".join(f"{v:.3f}" for v in r["ap50"]),
                "s/epoch "
                + " ".join(f"{v:.0f}" for v in r["epoch_s"])
                + " (training "
                + " ".join(f"{v:.0f}" for v in r["train_s"])
                + ", validation "
                + " ".join(f"{v:.0f}" for v in r["val_s"])
                + ")",
                r["peak_cuda_mb"],
            ]
        )
    if args.only == "train":
        _finish(rows, runs, start)
        return
    throughput = BENCH / "train_throughput.py"
    base = [*same, "--epochs", "2"]
    workers = [] if args.loader_workers is None else ["--loader-workers", str(args.loader_workers)]
    each = "" if args.loader_workers is None else f", {args.loader_workers} loader workers"
    argv = {"cellseg": [*base, "--variant", "cellseg", *workers], "plain": [*base, "--variant", "plain"]}
    loops = ("cellseg",) if args.only == "pack" else ("cellseg", "plain")
    one = {v: common.run_variant(throughput, argv[v]) for v in loops}
    speed = {v: r["images"] / r["seconds"] for v, r in one.items()}
    for v in loops:
        cellseg = v == "cellseg"
        add(
            [
                f"training loop: {v} (report A{each if cellseg else ''})",
                f"{speed[v]:.1f} images/s" + (_waiting([one[v]]) if cellseg else ""),
                f"{speed[v] / speed['plain']:.2f}x plain" if "plain" in speed else "-",
                one[v]["peak_cuda_mb"],
            ]
        )
    for n in args.pack:
        packed = common.run_variants(throughput, [argv["cellseg"]] * n)
        total = sum(r["images"] / r["seconds"] for r in packed)
        peaks = [r["peak_cuda_mb"] for r in packed]
        add(
            [
                f"{n} trainings on one GPU ({1 / n:g} each{each})",
                f"{total:.1f} images/s together" + _waiting(packed),
                f"{total / speed['cellseg']:.2f}x one alone",
                "-" if None in peaks else f"{max(peaks):.0f} each at most",
            ]
        )
    if args.only == "pack":
        _finish(rows, runs, start)
        return
    e = common.run_variant(__file__, ["--variant", "export", *same, "--run-dir", str(runs / "bf16")])
    add(
        [
            f"export, largest test image {e['image']}",
            f"{e['detections']} detections",
            f"{e['seconds']:.2f} s",
            e["peak_cuda_mb"],
        ]
    )
    _finish(rows, runs, start)


def _waiting(results: list[dict]) -> str:
    """The mean share of the timed seconds the cellseg trainings spent waiting for a batch."""
    share = sum(r["wait_seconds"] / r["seconds"] for r in results) / len(results)
    seconds = sum(r["seconds"] for r in results) / len(results)
    return f", {share:.0%} of {seconds:.0f} s waiting for data"


def _finish(rows: list[list], runs: Path, start: float) -> None:
    """The table of every row, the wall time, and the rows as one JSON line."""
    common.print_table(["what", "result", "speed", "peak GPU MiB"], rows)
    print(f"gpu_check: {time.perf_counter() - start:.0f} s; runs in {runs}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
