"""The second stage measured on the real slice: internal-test segm AP50 of the best trial raw, with
tuned inference settings, with test-time augmentation, refit on all training images, and the
ensemble of the three best trials, each step a user's command, in one run.

The real slice's training folders are split once (``--seed``) into an internal test set, written
in the test layout with its ground truth (symlinks, nothing copied), and the rest, which the
search splits into training and validation as always (``data.split_seed``). Then, as a user
would: ``search/run.py`` (``--trials`` trials, every epoch run), ``cellseg export --best`` and
``cellseg score`` for each row, ``cellseg tune-inference``, ``cellseg refit``. The base
configuration is trials/demo.yaml at the real images' own size (``--min-size``), sized for CPUs.

    python bench/real_second_stage.py --real ../shared/realdata/hw3-dev --out /tmp/second-stage
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

import common
from cellseg.data.layout import IMAGE_FILE, MAPPING_FILE, scan_train
from cellseg.data.sample import GROUND_TRUTH_FOLDER
from cellseg.data.tiff_io import read_image

CLI = [sys.executable, "-m", "cellseg.cli"]
RUN = [sys.executable, str(common.REPO / "search" / "run.py")]


def split_real(real: Path, out: Path, n_test: int, seed: int) -> Path:
    """``out/data``: ``n_test`` of ``real``'s training folders as a test set with ground truth,
    the others as training folders (all symlinks)."""
    data = out / "data"
    folders = sorted(item.folder for item in scan_train(real))
    test = set(random.Random(seed).sample(folders, n_test))
    mapping = []
    for folder in folders:
        if folder not in test:
            (data / "train").mkdir(parents=True, exist_ok=True)
            (data / "train" / folder.name).symlink_to(folder.resolve())
            continue
        truth = data / GROUND_TRUTH_FOLDER / folder.name
        truth.mkdir(parents=True)
        for mask in sorted(folder.glob("class*.tif")):
            (truth / mask.name).symlink_to(mask.resolve())
        (data / "test_release").mkdir(parents=True, exist_ok=True)
        (data / "test_release" / f"{folder.name}.tif").symlink_to((folder / IMAGE_FILE).resolve())
        height, width = read_image(folder / IMAGE_FILE).shape[:2]
        mapping.append(
            {"file_name": f"{folder.name}.tif", "id": len(mapping) + 1, "height": height, "width": width}
        )
    (data / MAPPING_FILE).write_text(json.dumps(mapping, indent=4))
    return data


def write_configs(out: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The base config (trials/demo.yaml at the real images' size) and a one-dimension space."""
    base = yaml.safe_load((common.TRIALS / "demo.yaml").read_text())
    base["model"].update(
        min_size=args.min_size,
        max_size=args.max_size,
        detections_per_img=args.detections,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=args.detections * 2,
    )
    base["train"].update(epochs=args.epochs, seed=args.seed, output_dir=str(out / "runs"))
    base["data"] = {"val_fraction": args.val_fraction, "split_seed": args.seed}
    space = {"params": {"optim.lr": {"loguniform": [args.lr_low, args.lr_high]}}}
    (out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    (out / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    return out / "base.yaml", out / "space.yaml"


class Steps:
    """Runs each command of the measurement, logging its output to ``out/logs/``."""

    def __init__(self, out: Path, data: Path) -> None:
        self.out, self.data = out, data
        self.store = ["--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "--experiment", "second-stage"]
        (out / "logs").mkdir(exist_ok=True)
        self.times: dict[str, float] = {}

    def run(self, name: str, command: list[str]) -> str:
        print(f"[{datetime.now(UTC):%H:%M:%S}] {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(
            command, cwd=self.out, capture_output=True, text=True, env=os.environ | {"RAY_ADDRESS": "local"}
        )
        self.times[name] = time.perf_counter() - start
        (self.out / "logs" / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise SystemExit(f"{name} failed ({done.returncode}); see {self.out / 'logs' / (name + '.log')}")
        return done.stdout

    def score(self, name: str, export: list[str]) -> float:
        """Export the internal test with ``export``'s flags and score it: segm AP50."""
        results = self.out / f"{name}.json"
        self.run(
            f"export-{name}",
            [
                *CLI,
                "export",
                *export,
                "--data",
                str(self.data),
                *self.store,
                "--output",
                str(results),
                "--no-progress",
            ],
        )
        scored = self.run(
            f"score-{name}", [*CLI, "score", "--results", str(results), "--data", str(self.data)]
        )
        return float(re.search(r"^segm_AP50: ([0-9.]+)$", scored, re.M).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, required=True, help="the real slice (hw3-dev)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for data, runs and logs")
    parser.add_argument(
        "--test-folders", type=int, default=11, help="training folders held out as internal test"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="internal-test split, validation split, training, TPE"
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--min-size", type=int, default=416)
    parser.add_argument("--max-size", type=int, default=704)
    parser.add_argument("--detections", type=int, default=300)
    parser.add_argument("--lr-low", type=float, default=5e-4)
    parser.add_argument("--lr-high", type=float, default=3e-3)
    parser.add_argument("--tune-trials", type=int, default=50)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(
            f"--out {args.out}: already exists; give a new folder (the run writes data, runs and logs there)"
        )
    if not 0 < args.test_folders < len(scan_train(args.real)):
        parser.error(f"--test-folders {args.test_folders}: must leave training folders in {args.real}")
    args.out.mkdir(parents=True)
    started = datetime.now(UTC)
    data = split_real(args.real, args.out, args.test_folders, args.seed)
    base, space = write_configs(args.out, args)
    steps = Steps(args.out, data)
    tune = [
        *CLI,
        "tune-inference",
        "--best",
        "--data",
        str(data),
        *steps.store,
        "--trials",
        str(args.tune_trials),
        "--seed",
        str(args.seed),
    ]
    steps.run(
        "search",
        [
            *RUN,
            "--data",
            str(data),
            "--base",
            str(base),
            "--space",
            str(space),
            "--num-samples",
            str(args.trials),
            "--grace-period",
            str(args.epochs),
            "--cpus-per-trial",
            "1",
            "--seed",
            str(args.seed),
            "--keep-top",
            str(args.trials),
            "--storage",
            str(args.out / "ray"),
            "--name",
            "real-slice",
            *steps.store,
        ],
    )
    rows = [("best trial, its own settings", steps.score("raw", ["--best", "--no-tuned-settings"]))]
    rows.append(
        (
            "+ flips (hflip, vflip merged), own settings",
            steps.score("flips", ["--best", "--no-tuned-settings", "--tta", "hflip", "vflip"]),
        )
    )
    steps.run("tune-no-tta", [*tune, "--no-tta", "--scales", "1"])
    rows.append(("+ tuned settings (scale 1, no flips searched)", steps.score("tuned", ["--best"])))
    steps.run("tune-tta", tune)
    rows.append(("+ tuned settings with scales and flips searched", steps.score("tuned-tta", ["--best"])))
    steps.run("refit", [*CLI, "refit", "--best", "--data", str(data), *steps.store, "--no-progress"])
    rows.append(
        ("+ refit on train + validation, tuned settings", steps.score("refit", ["--best", "--refit"]))
    )
    steps.run("tune-ensemble", [*tune, "--ensemble", str(args.trials)])
    rows.append(
        (
            f"ensemble of the {args.trials} best trials, tuned",
            steps.score("ensemble", ["--best", "--ensemble", str(args.trials)]),
        )
    )
    print(
        f"\nreal slice {args.real}, {args.test_folders} internal-test folders, seed {args.seed}, "
        f"{args.trials} trials x {args.epochs} epochs; {started:%Y-%m-%d %H:%M} UTC - "
        f"{datetime.now(UTC):%H:%M} UTC; {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print("| step | internal-test segm AP50 | gain over the row above |\n|---|---|---|")
    for (name, value), (_, previous) in zip(rows, [(None, None), *rows]):
        print(f"| {name} | {value:.4f} | {'' if previous is None else f'{value - previous:+.4f}'} |")
    print("\nseconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in steps.times.items()))


if __name__ == "__main__":
    main()
