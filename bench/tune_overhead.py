"""Ray Tune overhead: one trial through Tune against cellseg.training.fit called directly.

tune: ``ray.init(num_cpus=2)``, then a Tuner over ``search.trainable.train_trial`` (with
``tune.with_parameters``, as search/run.py builds it), one sample, storage in a temp dir. direct:
``fit`` on the same config and epochs, before and after the trial (once with --tiny). Each
runs in a fresh process; the overhead against the mean of the direct runs is
``Tuner.fit / fit - 1`` (and the same with ``ray.init`` and ``ray.shutdown`` counted).

    python bench/tune_overhead.py [--tiny] [--data DIR] [--device cuda] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import common
from cellseg.config import Config

VARIANTS = ("direct", "tune")


def run_direct(args: argparse.Namespace, cfg: Config) -> dict[str, float]:
    from cellseg.training import fit

    with tempfile.TemporaryDirectory(prefix="bench-direct-") as tmp:
        start = time.perf_counter()
        fit(cfg, run_dir=Path(tmp) / "run", progress=False)
        return {"fit_s": time.perf_counter() - start}


def run_tune(args: argparse.Namespace, cfg: Config) -> dict[str, float]:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    import ray
    from ray import tune

    from cellseg.config import config_to_dict
    from search.trainable import WORKER_RUNTIME_ENV, train_trial, trial_dirname

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        start = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=WORKER_RUNTIME_ENV,
        )
        init_s = time.perf_counter() - start
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, base=config_to_dict(cfg)),
            {"cpu": args.cpus_per_trial, "gpu": 1 if args.device == "cuda" else 0},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(
                metric=cfg.train.metric,
                mode="max",
                num_samples=1,
                trial_dirname_creator=trial_dirname,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name="bench",
                storage_path=tmp,
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
        start = time.perf_counter()
        results = tuner.fit()
        fit_s = time.perf_counter() - start
        if results.errors:
            raise RuntimeError(f"the trial failed: {results.errors[0]}")
        trial_s = results[0].metrics.get("time_total_s", float("nan"))
        start = time.perf_counter()
        ray.shutdown()
        return {
            "init_s": init_s,
            "fit_s": fit_s,
            "trial_s": trial_s,
            "shutdown_s": time.perf_counter() - start,
        }


def main() -> None:
    parser = common.make_parser(__doc__.splitlines()[0], VARIANTS)
    parser.add_argument("--epochs", type=int, help="train.epochs (default 1 tiny, 2 else)")
    parser.add_argument(
        "--cpus-per-trial",
        type=float,
        default=2,
        help="the trial's CPUs (Ray sets its torch threads from it); default 2",
    )
    args = parser.parse_args()
    args.epochs = args.epochs or (1 if args.tiny else 2)
    if args.variant:
        cfg = common.bench_config(
            args.data, tiny=args.tiny, device=args.device, overrides=[f"train.epochs={args.epochs}"]
        )
        common.emit_result((run_direct if args.variant == "direct" else run_tune)(args, cfg))
        return
    print(common.machine())
    with common.dataset_root(args) as root:
        argv = common.child_args(args, root) + [
            "--epochs",
            str(args.epochs),
            "--cpus-per-trial",
            str(args.cpus_per_trial),
        ]
        # Without --tiny, fit runs before and after the trial so that drifting load evens out.
        order = ["direct", "tune"] + ([] if args.tiny else ["direct"])
        runs = [(v, common.run_variant(__file__, [*argv, "--variant", v])) for v in order]
    directs = [r["fit_s"] for v, r in runs if v == "direct"]
    direct_s = sum(directs) / len(directs)
    tuned = next(r for v, r in runs if v == "tune")
    with_ray = tuned["init_s"] + tuned["fit_s"] + tuned["shutdown_s"]
    print(f"{args.epochs} epochs, one trial, {args.cpus_per_trial:g} CPUs per trial")
    common.print_table(
        ["run", "seconds"],
        [
            *[[f"fit (direct) run {i + 1}", t] for i, t in enumerate(directs)],
            ["fit (direct) mean", direct_s],
            ["ray.init", tuned["init_s"]],
            ["Tuner.fit", tuned["fit_s"]],
            ["  of which in the trial (time_total_s)", tuned["trial_s"]],
            ["ray.shutdown", tuned["shutdown_s"]],
            ["tune total", with_ray],
        ],
    )
    common.print_ratio("Tuner.fit/fit - 1", 100 * (tuned["fit_s"] / direct_s - 1), "%+")
    common.print_ratio("(init+Tuner.fit+shutdown)/fit - 1", 100 * (with_ray / direct_s - 1), "%+")


if __name__ == "__main__":
    main()
