"""bf16 mixed precision keeps box coordinates exact: box decoding runs in float32 under autocast
(torchvision's own decoding rounds anchors and proposals to bf16: 4 px steps above 512 px), and
scores too; validation predicts in bf16 only with ``train.amp_validation``; GroupNorm computes in
float32 in a CPU's training steps, as CUDA's autocast runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from cellseg.config import TrainConfig, load_config
from cellseg.data import make_synthetic_dataset
from cellseg.model import Float32BoxCoder, Float32GroupNorm, build_model
from cellseg.precision import validation_amp
from cellseg.predict import detect_images
from cellseg.torch_private import cpu_computes_bf16
from cellseg.torchvision_private import BoxCoder
from cellseg.training import build_training, fit

HEIGHT, WIDTH = 800, 1333  # the largest input the base config gives the model
DEMO = Path(__file__).resolve().parents[1] / "trials" / "demo.yaml"


@pytest.fixture(scope="module")
def model(tiny_model) -> torch.nn.Module:
    torch.manual_seed(0)
    large = tiny_model(min_size=800, max_size=1333, mask_head_channels=16, box_score_thresh=0.0)
    return build_model(large).eval()


def _anchors(model: torch.nn.Module) -> torch.Tensor:
    """The model's own anchors on an 800 x 1333 input (coordinates up to 1333 and beyond)."""
    images = ImageList(torch.zeros(1, 3, HEIGHT, WIDTH), [(HEIGHT, WIDTH)])
    features = [torch.zeros(1, 1, -(-HEIGHT // s), -(-WIDTH // s)) for s in (4, 8, 16, 32, 64)]
    [anchors] = model.rpn.anchor_generator(images, features)
    return anchors


@pytest.mark.parametrize("stage", ["rpn", "roi_heads"])
def test_proposals_and_final_boxes_are_float32_exact_under_bf16_autocast(model, stage) -> None:
    coder = getattr(model, stage).box_coder
    assert isinstance(coder, Float32BoxCoder)
    boxes = _anchors(model).clamp(0, WIDTH)  # proposals are clipped to the image
    if stage == "roi_heads":  # proposals: boxes anywhere, not only at anchor positions
        boxes = boxes + torch.rand(boxes.shape, generator=torch.Generator().manual_seed(1))
    assert boxes.max() > 1300
    deltas = torch.randn(len(boxes), 4, generator=torch.Generator().manual_seed(0)) * 0.1
    deltas = deltas.to(torch.bfloat16)  # what the heads return under bf16 autocast
    torchvision_coder = BoxCoder(coder.weights, coder.bbox_xform_clip)
    expected = torchvision_coder.decode(deltas.float(), [boxes])  # float32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = coder.decode(deltas, [boxes])
        rounded = torchvision_coder.decode(deltas, [boxes])
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 0.5
    assert (rounded.float() - expected).abs().max() > 2  # what torchvision alone would do


def test_a_model_under_bf16_autocast_gives_float32_boxes(model) -> None:
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        [out] = model([image])
    assert out["boxes"].dtype == torch.float32 and len(out["boxes"]) > 0
    assert out["boxes"][:, 2].max() <= WIDTH and out["boxes"][:, 3].max() <= HEIGHT


@pytest.mark.parametrize("amp", [True, False])
def test_train_amp_on_the_cpu_trains_in_bf16_where_the_cpu_computes_it(tmp_path: Path, amp) -> None:
    """train.amp on a CPU with bf16 arithmetic: the convolutions of the training steps run in
    bf16, the losses stay float32 and finite; on other CPUs, or with amp off, float32."""
    root = make_synthetic_dataset(tmp_path / "data", 5, 2, seed=0, profile="easy")
    overrides = [f"data.root={root}", "model.min_size=64", "model.max_size=128", f"train.amp={amp}"]
    t = build_training(load_config(DEMO, overrides))
    assert t.amp is (amp and cpu_computes_bf16()) and t.scaler is None
    dtypes = []
    t.model.backbone.body.conv1.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    losses = t.train_epoch(1)
    assert dtypes and set(dtypes) == {torch.bfloat16 if t.amp else torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


@pytest.mark.parametrize("amp", [True, False])
def test_detections_under_amp_run_in_bf16_and_come_back_float32(model, amp) -> None:
    """``detect_images(amp=True)`` (``train.amp_validation``) runs the model in bf16 and returns
    float32 boxes, scores and masks; its scores are not rounded to bf16 (the box predictor runs in
    float32), so detections close in score do not tie."""
    dtypes = []
    hook = model.backbone.body.conv1.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    image = torch.rand(3, 256, 384, generator=torch.Generator().manual_seed(3))
    try:
        [detections] = detect_images(model, [image], amp=amp)
    finally:
        hook.remove()
    assert dtypes == [torch.bfloat16 if amp else torch.float32]
    assert len(detections.scores) > 10
    for tensor in (detections.boxes, detections.scores, detections.masks):
        assert tensor.dtype == torch.float32
    if amp:  # not on bf16's steps of 1/256
        assert (detections.scores != detections.scores.bfloat16().float()).any()


@pytest.mark.parametrize(
    ("amp", "amp_validation", "device", "expected"),
    [
        (True, True, "cpu", cpu_computes_bf16()),
        (False, True, "cpu", False),  # float32 training validates in float32
        (True, False, "cpu", False),
        (True, True, "meta", False),  # neither CUDA nor a CPU: no reduced precision
    ],
)
def test_validation_predicts_in_bf16_only_with_amp_validation_where_amp_computes_bf16(
    amp, amp_validation, device, expected
) -> None:
    cfg = TrainConfig(amp=amp, amp_validation=amp_validation)
    assert validation_amp(cfg, torch.device(device)) is expected


@pytest.mark.skipif(not cpu_computes_bf16(), reason="train.amp trains in float32 on this CPU")
@pytest.mark.parametrize("amp_validation", [True, False])
def test_fit_validates_in_bf16_with_train_amp_validation(tmp_path: Path, amp_validation) -> None:
    """``fit`` predicts its validation images in bf16 with ``train.amp_validation`` and in float32
    without it (the training steps in bf16 either way)."""
    root = make_synthetic_dataset(tmp_path / "data", 5, 2, seed=0, profile="easy")
    overrides = [f"data.root={root}", "model.min_size=64", "model.max_size=128", "train.epochs=1"]
    cfg = load_config(DEMO, [*overrides, f"train.amp_validation={amp_validation}"])
    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}  # training mode -> dtypes

    def record(module: torch.nn.Module, inputs: tuple, out: object) -> None:
        if isinstance(module, torch.nn.Conv2d) and isinstance(out, torch.Tensor):
            seen[module.training].add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        fit(cfg, run_dir=tmp_path / "run", progress=False)
    finally:
        handle.remove()
    assert seen[True] == {torch.bfloat16}
    assert seen[False] == {torch.bfloat16 if amp_validation else torch.float32}


def test_group_norm_trains_in_float32_and_returns_the_inputs_dtype(tiny_model) -> None:
    torch.manual_seed(0)
    norm = Float32GroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(2, 64, 12, 10) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    saved: list[torch.dtype] = []  # what autograd keeps for the backward pass: float32, not bf16

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.dtype)
        return tensor

    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
    ):
        y = norm(x)
    assert torch.bfloat16 not in saved and torch.float32 in saved
    reference = torch.nn.functional.group_norm(
        x.detach().double(), 32, norm.weight.double(), norm.bias.double()
    )
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), reference, atol=0.02, rtol=0.01)  # bf16 rounding of the output
    grad = torch.randn(2, 64, 12, 10)
    y.backward(grad.bfloat16())
    x64 = x.detach().double().requires_grad_()
    torch.nn.functional.group_norm(x64, 32, norm.weight.double(), norm.bias.double()).backward(grad.double())
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=0.02, rtol=0.02)
    float32 = torch.randn(2, 64, 6, 5)
    torch.testing.assert_close(norm(float32), torch.nn.GroupNorm.forward(norm, float32), rtol=0, atol=0)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # predictions: bf16
        assert torch.equal(norm(x.detach()), torch.nn.GroupNorm.forward(norm, x.detach()))
    assert all(
        isinstance(m, Float32GroupNorm)
        for m in build_model(tiny_model(norm="gn")).modules()
        if isinstance(m, torch.nn.GroupNorm)
    )
