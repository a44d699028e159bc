"""``cellseg`` command line: inspect, synth, train, refit, evaluate, tune-inference, export, score."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cellseg.config import DataConfig, ModelConfig, load_config
from cellseg.data import PROFILES
from cellseg.errors import USER_ERRORS, ConfigError

if TYPE_CHECKING:
    from cellseg.training import FitResult

log = logging.getLogger("cellseg")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from cellseg.data import dataset_stats, format_stats

    stats = dataset_stats(
        args.data,
        detections_per_img=args.detections_per_img,
        max_pixels=args.max_pixels,
        max_instances=args.max_instances,
        progress=not args.json,
    )
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from cellseg.data import make_synthetic_dataset

    out = make_synthetic_dataset(args.out_dir, args.train, args.test, args.seed, profile=args.profile)
    print(out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cellseg.commands import train_and_track

    overrides = list(args.set)
    if args.data:
        overrides.append(f"data.root={Path(args.data).resolve()}")
    cfg = load_config(args.config, overrides)
    if not cfg.data.root:
        raise ConfigError(f"{args.config}: no dataset; pass --data DIR (or set data.root)")
    name = args.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train_and_track(
        cfg,
        name=name,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        resume_from=args.resume,
        config_path=Path(args.config),
        progress=not args.no_progress,
    )
    _print_fit(result, cfg.train.metric)
    return 0


def _print_fit(result: FitResult, metric: str) -> None:
    if math.isfinite(result.best_metric):
        print(f"best {metric} {result.best_metric:.4f} at epoch {result.best_epoch}")
    else:
        print(f"no validation (data.val_fraction 0): the final epoch {result.best_epoch} is saved")
    print(f"checkpoint: {result.best_checkpoint}")


def _cmd_refit(args: argparse.Namespace) -> int:
    from cellseg.commands import refit_and_track

    if args.search and not args.best:
        raise ConfigError("--search chooses among the runs of --best; add --best")
    with tempfile.TemporaryDirectory() as scratch:
        plan, result = refit_and_track(
            run_id=args.run_id,
            best=args.best,
            search=args.search,
            config_path=Path(args.config) if args.config else None,
            data_root=args.data,
            overrides=list(args.set),
            epochs=args.epochs,
            name=args.name,
            experiment=args.experiment,
            tracking_uri=args.tracking_uri,
            scratch=Path(scratch),
            progress=not args.no_progress,
        )
    _print_fit(result, plan.config.train.metric)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cellseg.bootstrap import SEED
    from cellseg.commands import evaluate_checkpoint

    metrics, interval = evaluate_checkpoint(
        args.checkpoint, data_root=args.data, progress=not args.no_progress, interval=args.ci
    )
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    if interval is not None:
        print(
            f"segm_AP50 {interval.level:.0%} interval: [{interval.low:.4f}, {interval.high:.4f}] "
            f"(width {interval.width:.4f}; bootstrap over {interval.images} validation images, "
            f"{len(interval.samples)} resamples, seed {SEED})"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cellseg.commands import export_run
    from cellseg.tta import DEFAULT_TTA

    with tempfile.TemporaryDirectory() as scratch:
        summary = export_run(
            checkpoints=args.checkpoint or [],
            best=args.best,
            tracking_uri=args.tracking_uri,
            **_run_choice(args),
            output=Path(args.output),
            zip_path=Path(args.zip) if args.zip else None,
            score_threshold=args.score_threshold,
            scratch=Path(scratch),
            progress=not args.no_progress,
            ensemble=args.ensemble,
            flips=DEFAULT_TTA if args.tta == [] else tuple(args.tta or ()),
            iou_threshold=args.merge_iou,
            refit=args.refit,
            use_tuned=not args.no_tuned_settings,
        )
    return _print_summary(summary)


def _run_choice(args: argparse.Namespace) -> dict[str, str | None]:
    """The flags that choose an MLflow run (--run-id, or --best's --search, --data, --experiment)."""
    if args.search and not args.best:
        raise ConfigError("--search chooses among the runs of --best; add --best")
    return {
        "run_id": args.run_id,
        "search": args.search,
        "data_root": args.data,
        "experiment": args.experiment,
    }


def _print_summary(summary: dict) -> int:
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _search_module(name: str):
    """``search.<name>`` of the checkout this cellseg runs from. search/ holds the Optuna and Ray
    parts and is not installed (docs/design.md), so its folder goes on the path."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "search" / "__init__.py").is_file():
        raise ConfigError(
            f"this command needs the search/ folder of a cellseg checkout beside {root / 'cellseg'}; "
            "install cellseg from its repository with pip install -e ."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"search.{name}")


def _cmd_tune_inference(args: argparse.Namespace) -> int:
    from cellseg.tracking import Tracker

    tuning = _search_module("tune_inference")
    choice = _run_choice(args)
    tracker = Tracker(args.tracking_uri)
    tracker.check()
    given = {  # the others keep search/tune_inference.py's defaults
        key: value
        for key, value in (
            ("scales", args.scales and tuple(args.scales)),
            ("flips", () if args.no_tta else None),
            ("ensemble", args.ensemble),
            ("trials", args.trials),
            ("cache_detections", args.cache_detections),
            ("cache_nms_iou", args.cache_nms_iou),
            ("max_cache_mb", args.max_cache_mb),
        )
        if value is not None
    }
    with tempfile.TemporaryDirectory() as scratch:
        summary = tuning.tune_inference(
            tracker,
            scratch=Path(scratch),
            sampler=args.sampler,
            seed=args.seed,
            progress=not args.no_progress,
            **choice,
            **given,
        )
    return _print_summary(summary)


def _cmd_score(args: argparse.Namespace) -> int:
    from cellseg.commands import score_export

    metrics = score_export(Path(args.results), Path(args.data))
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="dataset statistics")
    p.add_argument("data", help="dataset folder (train/, test_release/, mapping json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--detections-per-img",
        type=int,
        default=ModelConfig.detections_per_img,
        help="warn about images holding more instances than this",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DataConfig.max_pixels,
        help="refuse images and masks larger than this (data.max_pixels)",
    )
    p.add_argument(
        "--max-instances",
        type=int,
        default=DataConfig.max_instances,
        help="refuse training images with more instances (data.max_instances)",
    )
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("synth", help="write a synthetic dataset in the real layout")
    p.add_argument("out_dir")
    p.add_argument("--train", type=at_least(0), default=40, help="training images")
    p.add_argument("--test", type=at_least(0), default=10, help="test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        default="realistic",
        choices=PROFILES,
        help="realistic: the real data's quirks and sizes; easy: small images with a "
        "few large cells, for quick learning checks",
    )
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train one configuration, logged to MLflow")
    p.add_argument("--config", required=True, help="YAML config, e.g. trials/demo.yaml")
    p.add_argument("--data", help="dataset folder (overrides data.root)")
    _add_run_options(p, "config name and time")
    p.add_argument("--resume", help="run directory of an interrupted run to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "refit",
        help="train a run's configuration on every training image (no validation), for the "
        "epochs at which that run validated best (docs/second-stage.md)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="a training run or search trial by its MLflow run id")
    source.add_argument(
        "--config", help="a YAML config, trained for its train.epochs (or --epochs) on --data"
    )
    _add_best_source(p, source.add_argument)
    p.add_argument(
        "--data",
        help="dataset folder, every training image of which is trained on (default with "
        "--run-id: the run's own data.root)",
    )
    p.add_argument(
        "--epochs",
        type=at_least(1),
        help="train this many epochs instead of ceil(best epoch x its training images / all images)",
    )
    _add_run_options(
        p,
        "refit-<source run name>-<time>",
        experiment=None,
        experiment_help="MLflow experiment (default: the --run-id run's own, the only one allowed "
        "there; else cellseg)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_refit)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on its validation split")
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt or a run directory")
    p.add_argument("--data", help="dataset folder (default: the one stored in the checkpoint)")
    p.add_argument(
        "--ci",
        action="store_true",
        help="also a 95%% interval of segm_AP50: a bootstrap over the validation images "
        "(1000 resamples, seed 0; about a second on top of the prediction)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "tune-inference",
        help="search inference settings (score threshold, NMS, detections, mask threshold, test "
        "scales, flips, ensemble size) on cached validation predictions; export --best then uses them",
        description="Predict the chosen run's validation split (with --ensemble K, each of the K "
        "best runs') once per test scale and view (the image, and hflip and vflip unless --no-tta) "
        "into a bounded in-memory cache, then search score threshold, NMS IoU (class-wise or "
        "not), detections per image, mask threshold, the set of test scales merged, TTA on/off "
        "and the ensemble size (1 to K, best runs first) with Optuna on the cache, without running "
        "a model again (docs/second-stage.md). Logs an MLflow run nested under the search and, "
        "when the best settings beat the model's own in 95%% of paired bootstrap resamples of "
        "the validation images, saves inference.json (inference-ensemble<K>.json; with the "
        "checkpoints' SHA-256 and the data fingerprint) beside the best run's checkpoint; "
        "otherwise removes an older one, so that export uses the model's own settings.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--run-id", help="tune this MLflow run's model")
    target.add_argument(
        "--best", action="store_true", help="the run export --best would choose on --data (required)"
    )
    p.add_argument("--search", help="with --best: choose within this search instead of the most recent one")
    p.add_argument(
        "--data", help="dataset folder (default: the one stored in the checkpoint; required with --best)"
    )
    p.add_argument(
        "--experiment",
        help="MLflow experiment of --best (default cellseg); with --run-id the run's own, where "
        "the tuning is logged",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        metavar="S",
        help="test scales, multiples of the trained model.min_size/max_size; must include 1, "
        "each once (each costs one validation pass per view and model; the search tries each "
        "alone and every set of them merged; default 1 1.25 1.5)",
    )
    p.add_argument(
        "--no-tta", action="store_true", help="do not try flipped views (predicts a third of the passes)"
    )
    p.add_argument(
        "--ensemble",
        type=int,
        metavar="K",
        help="with --best: cache the K best runs (export --ensemble K's choice; they must share "
        "one validation split) and search the ensemble size 1..K as well, recording the single "
        "best against each size; K times the passes (default 1: the best run alone)",
    )
    p.add_argument("--sampler", choices=("tpe", "grid"), default="tpe", help="Optuna's TPE, or a grid")
    p.add_argument(
        "--trials",
        type=at_least(1),
        help="settings scored (default 50; a grid search takes this many of its points)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler")
    p.add_argument(
        "--cache-detections",
        type=at_least(1),
        help="detections kept per image and pass in the cache, the most a setting can keep "
        "(default twice model.detections_per_img)",
    )
    p.add_argument(
        "--cache-nms-iou",
        type=float,
        help="the cache's own class-wise NMS IoU, the loosest a setting can use (default 0.7; 1: none; exact "
        "post-hoc NMS at every IoU, but near-duplicates fill the cache)",
    )
    p.add_argument(
        "--max-cache-mb",
        type=float,
        help="refuse to start when the cache could exceed this many MiB (default 2048; passes "
        "(models x scales x views) x images x detections x 1.6 kB)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_tune_inference)

    p = sub.add_parser("export", help="predict the test images and write test-results.json")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        action="append",
        help="a checkpoint file or run directory; repeat it to merge several models (an ensemble)",
    )
    source.add_argument("--run-id", help="an MLflow run id whose checkpoint to use")
    _add_best_source(p, source.add_argument)
    p.add_argument("--experiment", default="cellseg", help="MLflow experiment for --best")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument(
        "--data", help="dataset folder (default: the one stored in the checkpoint; required with --best)"
    )
    p.add_argument(
        "--output", default="test-results.json", help="the submission (and <stem>.provenance.json)"
    )
    p.add_argument("--zip", help="also write a zip holding test-results.json")
    p.add_argument(
        "--score-threshold",
        type=float,
        help="drop detections below this score (default 0: AP50 rewards keeping nearly all)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="export the refit (cellseg refit) of the run --best or --run-id chooses",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="K",
        help="with --best: merge the K best runs of the chosen search (default 1), with the "
        "settings cellseg tune-inference --best --ensemble K tuned for exactly these runs, if any",
    )
    p.add_argument(
        "--tta",
        nargs="*",
        metavar="FLIP",
        help="test-time augmentation: also predict the image flipped (hflip, vflip, "
        "hvflip; bare --tta: hflip vflip) and merge the passes",
    )
    p.add_argument(
        "--merge-iou",
        type=float,
        help="box IoU at which detections of two passes (flips or models) are the same "
        "instance (default: docs/second-stage.md)",
    )
    p.add_argument(
        "--no-tuned-settings",
        action="store_true",
        help="predict with the model's own settings even when cellseg tune-inference saved tuned "
        "ones beside the run's checkpoint (--best, --run-id and --best --ensemble K use them by default)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("score", help="score a test-results.json against test_ground_truth/")
    p.add_argument("--results", required=True)
    p.add_argument("--data", required=True, help="a synthetic dataset folder with test_ground_truth/")
    p.set_defaults(func=_cmd_score)
    return parser


def _add_best_source(p: argparse.ArgumentParser, add_source: Callable[..., argparse.Action]) -> None:
    """--best, added by ``add_source`` (the ``add_argument`` of the source choices), and --search,
    which narrows it."""
    add_source(
        "--best",
        action="store_true",
        help="the best trial of the most recent search (or training run) of "
        "--experiment trained on --data (required with --best)",
    )
    p.add_argument(
        "--search",
        help="with --best: choose within this search (or training run) instead of the most recent one",
    )


def _add_run_options(
    p: argparse.ArgumentParser,
    default_name: str,
    *,
    experiment: str | None = "cellseg",
    experiment_help: str = "MLflow experiment",
) -> None:
    """--set, --name, --experiment and --tracking-uri of a command that trains a tracked run."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument("--name", help=f"run name (default: {default_name})")
    p.add_argument("--experiment", default=experiment, help=experiment_help)
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``."""

    def whole_number(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return int(text)

    return whole_number


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (errors print one line, exit code 2)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except USER_ERRORS as exc:  # anything else is a bug and keeps its traceback
        print(f"cellseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
