"""Validation cost: wall time of cellseg.engine.evaluate as a share of one training epoch.

The bench preset with ``model.detections_per_img=500``, ``box_score_thresh=0`` and 1000 test
proposals, so that the barely trained model emits hundreds of detections per image (as the GPU
search's base config does). Decoded samples are cached first, as in fit() from epoch 2 on. The
evaluate time is split over the calls it makes: ``predict_images`` (inference, then paste + RLE
in ``cellseg.predict._encode_masks``), ``truth_from_masks`` (ground-truth RLE), ``coco_metrics``
(COCOeval) and the rest (the validation-loss forward pass and transfers).

    python bench/eval_share.py [--tiny] [--data DIR] [--device cuda] [--detections N]
"""

from __future__ import annotations

import time

import torch

import cellseg.engine as engine
import cellseg.predict as predict
import common
from cellseg.data import CellDataset
from cellseg.evaluation import coco_max_dets
from cellseg.training import build_training

TIMED = ("predict_images", "truth_from_masks", "coco_metrics")


def warm_cache(dataset: CellDataset) -> None:
    """Decode every sample once (kept when the dataset caches)."""
    for index in range(len(dataset)):
        dataset.decoded(index)


def main() -> None:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, default=500, help="model.detections_per_img")
    args = parser.parse_args()
    print(common.machine())
    overrides = [
        f"model.detections_per_img={args.detections}",
        "model.box_score_thresh=0.0",
        "model.rpn_pre_nms_top_n_test=1000",
        "model.rpn_post_nms_top_n_test=1000",
    ]
    device = torch.device(args.device)
    with common.dataset_root(args) as root:
        cfg = common.bench_config(
            root, tiny=args.tiny, device=args.device, overrides=[*overrides, "train.epochs=1"]
        )
        s = build_training(cfg)
        warm_cache(s.train_loader.dataset)
        warm_cache(s.val_loader.dataset)
        train = common.TimedLoader(s.train_loader, skip=0, device=device)
        s.train_epoch(1, loader=train)
        totals: dict[str, float] = {}
        outputs: dict[str, list] = {}
        paste: dict[str, float] = {}
        with (
            common.timed_calls(engine, TIMED, totals, outputs),
            common.timed_calls(predict, ["_encode_masks"], paste),
        ):
            start = time.perf_counter()
            engine.evaluate(
                s.model,
                s.val_loader,
                device,
                amp=s.amp,
                progress=False,
                max_dets=coco_max_dets(cfg.model.detections_per_img),
                with_loss=cfg.train.val_loss,
            )
            common.synchronize(device)
            eval_s = time.perf_counter() - start
    val_images = len(s.val_loader.dataset)
    detections = sum(len(p.scores) for batch in outputs.get("predict_images", []) for p in batch)
    print(
        f"model {cfg.model.backbone} min/max size {cfg.model.min_size}/{cfg.model.max_size}, "
        f"detections_per_img {cfg.model.detections_per_img}: "
        f"{detections / max(val_images, 1):.0f} detections per validation image"
    )
    rows = [
        ["train_one_epoch", train.images, train.seconds, train.seconds / max(train.images, 1)],
        ["evaluate", val_images, eval_s, eval_s / max(val_images, 1)],
    ]
    rows += [[f"  {name}", "", totals.get(name, 0.0), ""] for name in TIMED]
    rows.insert(3, ["    of which paste + RLE", "", paste.get("_encode_masks", 0.0), ""])
    rows.append(["  rest (loss forward)", "", eval_s - sum(totals.values()), ""])
    common.print_table(["phase", "images", "seconds", "s/image"], rows)
    common.print_ratio("evaluate/train epoch", 100 * eval_s / train.seconds, "%")


if __name__ == "__main__":
    main()
