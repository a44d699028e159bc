"""Search efficiency and disk: a (reduced) demo search through search/run.py, its useful share and
the run data it leaves.

Runs ``search/run.py`` with ``--num-samples N`` on the demo base and space (``trials/demo.yaml``,
``trials/space_demo.yaml``; the demo data under ``.cellseg/``, made once) into a temp folder
(Tune storage, MLflow SQLite store and artifacts), measures the run data every 2 s for its peak,
and prints what the driver logged to the parent run: useful share (trials inside training and
validation / wall time x slots) against Tune's trial-time share (the baseline: Tune's own trial
time, which also counts set-up inside the trial and the checkpoints), and the run data at its
peak and at the end, with the best.pt files kept.

    python bench/search_efficiency.py [--tiny] [--data DIR] [--num-samples N] [--keep-top K]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import yaml

import common
from cellseg.config import config_to_dict
from cellseg.tracking import DEFAULT_EXPERIMENT, SEARCH_TAG, Tracker

NAME = "bench"
SPACE = common.TRIALS / "space_demo.yaml"


def disk_bytes(paths: list[Path]) -> int:
    """Bytes on disk under ``paths`` (files and folders; missing ones count 0), each file once
    however many hard links it has (storage links a checkpoint's unchanged files)."""
    blocks: dict[tuple[int, int], int] = {}
    for path in paths:
        files = [path] if path.is_file() else [Path(d, f) for d, _, fs in os.walk(path) for f in fs]
        for file in files:
            try:
                st = file.stat()
            except OSError:  # removed meanwhile
                continue
            blocks[st.st_dev, st.st_ino] = st.st_blocks * 512
    return sum(blocks.values())


class PeakDisk:
    """Polls the size of ``paths`` every ``every_s`` seconds in a thread; keeps the peak."""

    def __init__(self, paths: list[Path], every_s: float = 2.0) -> None:
        self.paths, self.every_s, self.peak = paths, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, disk_bytes(self.paths))

    def __enter__(self) -> PeakDisk:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_bytes(self.paths))


def search_command(args: argparse.Namespace, folder: Path, data: Path | None) -> list[str]:
    """The search's command line; its run data goes under ``folder``."""
    argv = [
        sys.executable,
        str(common.REPO / "search" / "run.py"),
        "--space",
        str(SPACE),
        "--storage",
        str(folder / "storage"),
        "--tracking-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--name",
        NAME,
        "--num-samples",
        str(args.num_samples),
        "--seed",
        str(args.seed),
    ]
    if args.keep_top is not None:
        argv += ["--keep-top", str(args.keep_top)]
    if args.max_epochs:
        argv += ["--max-epochs", str(args.max_epochs)]
    if data is not None:
        argv += ["--data", str(data)]
    if args.tiny:  # the demo preset at --tiny's input size, written beside the run data
        base = folder / "base.yaml"
        cfg = common.bench_config(data, tiny=True, device="cpu")
        base.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        argv += ["--base", str(base)]
    return argv


def main() -> None:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, help="trials (default 8; 2 with --tiny)")
    parser.add_argument(
        "--max-epochs", type=int, help="epochs of a full trial (default: the demo's 6; 2 with --tiny)"
    )
    parser.add_argument("--keep-top", type=int, help="passed to search/run.py (default: its own)")
    parser.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("the demo search runs on the CPU; --device cuda is not supported here")
    args.num_samples = args.num_samples or (2 if args.tiny else 8)
    args.max_epochs = args.max_epochs or (2 if args.tiny else None)
    print(common.machine())
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        folder = Path(tmp)
        # without --tiny or --data: the demo's own data (search/run.py makes it once)
        with common.dataset_root(args) if args.tiny or args.data else nullcontext() as data:
            argv = search_command(args, folder, data)
            print("command:", " ".join(argv[1:]))
            stores = [folder / "storage", folder / "mlflow.db", folder / "mlartifacts"]
            start = time.perf_counter()
            with PeakDisk(stores) as disk:
                # its progress passes through; a Ray of its own, never a cluster named in the environment
                proc = subprocess.run(argv, cwd=common.REPO, env={**os.environ, "RAY_ADDRESS": "local"})
            wall_s = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"search/run.py exited with {proc.returncode}")
            tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
            [parent] = tracker.records(DEFAULT_EXPERIMENT, f"tags.`{SEARCH_TAG}` = '{NAME}'")
            kept = list((folder / "mlartifacts").rglob("best.pt")) + list(
                (folder / "storage").rglob("best.pt")
            )
            end = {path.name: disk_bytes([path]) for path in stores}
    metrics = parent.metrics
    common.print_table(
        ["figure", "value"],
        [
            ["trials", int(metrics["trials"])],
            ["epochs run", int(metrics["epochs_run"])],
            ["wall time of search/run.py (s)", wall_s],
            ["trial slots", int(metrics["trial_slots"])],
            ["trials inside training and validation (s)", metrics["trial_busy_s"]],
            ["useful share (%)", 100 * metrics["useful_share"]],
            ["Tune's trial-time share (%)", 100 * metrics["trial_time_share"]],
            ["run data at its peak (MB)", disk.peak / 1e6],
            ["run data at the end (MB)", sum(end.values()) / 1e6],
            *[[f"  of which {name} (MB)", size / 1e6] for name, size in end.items()],
            ["best.pt files kept", len(kept)],
        ],
    )
    common.print_ratio("useful share", 100 * metrics["useful_share"], "%")
    common.print_ratio("Tune's trial-time share", 100 * metrics["trial_time_share"], "%")


if __name__ == "__main__":
    main()
