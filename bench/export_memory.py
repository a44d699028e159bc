"""Inference for export: cellseg.predict.predict_images against torchvision's default path.

torchvision: ``model(images)`` in eval mode pastes every mask at full image size at once (an
(N, 1, H, W) float tensor, built from a list of N full-size tensors), then each mask is thresholded
and RLE-encoded with pycocotools (the model as torchvision runs it: NCHW, torchvision's RoIAlign).
cellseg: ``build_model``'s model and ``predict_images``, which pastes one mask at a time into its
box and RLE-encodes it at once. An untrained model with score threshold 0 emits
``--detections`` detections per image. Each (size, variant) runs in a fresh process; sizes are
width x height: the largest real test sizes 2500x735 and 1771x1760 and a small one.

    python bench/export_memory.py [--tiny] [--data DIR] [--device cuda] [--detections N] [--repeat R]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils

import common
from cellseg.data import load_test_images, read_image
from cellseg.model import build_model
from cellseg.predict import predict_images

VARIANTS = ("torchvision", "cellseg")
SIZES_FULL = ("256x256", "2500x735", "1771x1760")  # width x height
SIZES_TINY = ("128x128", "625x184")


def torchvision_path(model: torch.nn.Module, image: torch.Tensor) -> int:
    """torchvision's postprocess, then threshold and one pycocotools RLE per mask."""
    with torch.inference_mode():
        [output] = model([image])
    masks = (output["masks"][:, 0] > 0.5).cpu().numpy()
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    return len(rles)


def cellseg_path(model: torch.nn.Module, image: torch.Tensor) -> int:
    [prediction] = predict_images(model, [image])
    return len(prediction.rles)


def load_input(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """The --image file, or a random (3, H, W) image of --size (width x height)."""
    if args.image:
        array = read_image(args.image)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(device)
    width, height = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.random((3, height, width), dtype=np.float32)).to(device)


def run_child(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    cfg = common.bench_config(
        None,
        tiny=args.tiny,
        device=args.device,
        overrides=[
            f"model.detections_per_img={args.detections}",
            "model.box_score_thresh=0.0",
            "model.rpn_pre_nms_top_n_test=1000",
            "model.rpn_post_nms_top_n_test=1000",
        ],
    )
    torch.manual_seed(0)
    if args.variant == "torchvision":
        model, run = common.torchvision_model(cfg.model), torchvision_path
    else:
        model, run = build_model(cfg.model), cellseg_path
    model = model.eval().to(device)
    run(model, torch.rand(3, 64, 64, device=device))  # warm-up, not timed
    image = load_input(args, device)
    before = common.peak_memory()["peak_rss_mb"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    detections = [run(model, image) for _ in range(args.repeat)]
    common.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "images": args.repeat,
        "seconds": seconds,
        "detections": detections[-1],
        "rss_before_mb": before,
        **common.peak_memory(),
    }


def dataset_inputs(root: str) -> list[tuple[str, list[str]]]:
    """The smallest and the two largest test images of a dataset, as (label, child flags)."""
    images = sorted(load_test_images(root), key=lambda t: t.height * t.width)
    chosen = images[:1] + images[-2:] if len(images) > 2 else images
    return [(f"{t.width}x{t.height}", ["--image", str(t.path)]) for t in chosen]


def main() -> None:
    parser = common.make_parser(__doc__.splitlines()[0], VARIANTS)
    parser.add_argument(
        "--detections", type=int, help="detections per image (default 100 on CPU, 500 on CUDA)"
    )
    parser.add_argument("--repeat", type=int, help="timed images per size (default 1 tiny, 2 else)")
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.detections = args.detections or (500 if args.device == "cuda" else 100)
    args.repeat = args.repeat or (1 if args.tiny else 2)
    if args.variant:
        common.emit_result(run_child(args))
        return
    print(common.machine())
    inputs = (
        dataset_inputs(args.data)
        if args.data
        else [(s, ["--size", s]) for s in (SIZES_TINY if args.tiny else SIZES_FULL)]
    )
    argv = ["--device", args.device, "--detections", str(args.detections), "--repeat", str(args.repeat)] + (
        ["--tiny"] if args.tiny else []
    )
    rows, ratios = [], []
    for label, flags in inputs:
        r = {v: common.run_variant(__file__, [*argv, *flags, "--variant", v]) for v in VARIANTS}
        for v in VARIANTS:
            x = r[v]
            rows.append(
                [
                    label,
                    v,
                    x["detections"],
                    x["images"] / x["seconds"],
                    x["peak_rss_mb"],
                    x["peak_rss_mb"] - x["rss_before_mb"],
                    x["peak_cuda_mb"],
                ]
            )
        t, c = r["torchvision"], r["cellseg"]
        ratios.append(
            (
                label,
                (c["images"] / c["seconds"]) / (t["images"] / t["seconds"]),
                c["peak_rss_mb"] / t["peak_rss_mb"],
            )
        )
    common.print_table(
        ["size WxH", "path", "detections", "images/s", "peak RSS MiB", "RSS added MiB", "peak CUDA MiB"], rows
    )
    for label, speed, memory in ratios:
        common.print_ratio(f"images/s cellseg/torchvision {label}", speed)
        common.print_ratio(f"peak RSS cellseg/torchvision {label}", memory)


if __name__ == "__main__":
    main()
