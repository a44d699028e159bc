"""build_model: backbones, norms, anchors, heads, resize policy, weights and the parameter limit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from cellseg.errors import ConfigError
from cellseg.model import (
    MAX_TRAINABLE_PARAMETERS,
    build_model,
    check_parameter_budget,
    count_trainable_parameters,
)
from cellseg.weights import MIRROR_ENV
from searchutil import free_port


def tiny_target() -> dict[str, torch.Tensor]:
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:34] = 1
    return {
        "boxes": torch.tensor([[12.0, 10.0, 34.0, 30.0]]),
        "labels": torch.tensor([2]),
        "masks": masks,
    }


@pytest.mark.parametrize(("backbone", "upscale_small"), [("resnet18", True), ("resnet34", False)])
def test_small_backbones_predict_and_train(tiny_model, backbone: str, upscale_small: bool) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model(backbone=backbone, upscale_small=upscale_small))
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 64)])
    assert set(out) == {"boxes", "labels", "scores", "masks"}
    model.train()
    losses = model([torch.rand(3, 64, 64)], [tiny_target()])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_parameter_counts_grow_with_backbone_depth(tiny_model) -> None:
    counts = [
        count_trainable_parameters(build_model(tiny_model(backbone=b, trainable_layers=5)))
        for b in ("resnet18", "resnet34", "resnet50", "resnet101")
    ]
    assert counts == sorted(counts)
    assert counts[-1] < MAX_TRAINABLE_PARAMETERS


def test_predictors_have_background_plus_classes(tiny_model) -> None:
    model = build_model(tiny_model(), num_classes=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4


@pytest.mark.parametrize(
    ("anchors", "sizes"),
    [
        ("default", (32, 64, 128, 256, 512)),
        ("small", (8, 16, 32, 64, 128)),
        ("tiny", (4, 8, 16, 32, 64)),
    ],
)
def test_named_anchors_reach_the_generator(tiny_model, anchors: str, sizes: tuple[int, ...]) -> None:
    gen = build_model(tiny_model(anchors=anchors, aspect_ratios=(0.5, 1.0))).rpn.anchor_generator
    assert gen.sizes == tuple((s,) for s in sizes)
    assert gen.aspect_ratios == ((0.5, 1.0),) * 5


def test_custom_anchor_sizes_and_rpn_head_width(tiny_model) -> None:
    model = build_model(tiny_model(anchors="custom", anchor_sizes=(6, 12, 24, 48, 96)))
    assert model.rpn.anchor_generator.sizes == ((6,), (12,), (24,), (48,), (96,))
    assert model.rpn.head.cls_logits.out_channels == 3


def test_custom_anchor_sizes_need_one_per_level(tiny_model) -> None:
    with pytest.raises(ConfigError, match=r"model\.anchor_sizes.*exactly 5"):
        build_model(tiny_model(anchors="custom", anchor_sizes=(8, 16, 32)))


@pytest.mark.parametrize("norm", [True, False])
def test_mask_head_follows_config(tiny_model, norm: bool) -> None:
    model = build_model(tiny_model(mask_head_channels=32, mask_head_convs=2, mask_head_norm=norm))
    head = model.roi_heads.mask_head
    assert len(head) == 2
    assert [block[0].out_channels for block in head] == [32, 32]
    assert any(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == norm
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 32


def test_rpn_and_roi_settings_reach_the_model(tiny_model) -> None:
    model = build_model(
        tiny_model(
            detections_per_img=321,
            box_score_thresh=0.02,
            box_nms_thresh=0.4,
            box_batch_size_per_image=64,
            rpn_nms_thresh=0.6,
            rpn_pre_nms_top_n_test=1500,
            rpn_post_nms_top_n_train=700,
        )
    )
    roi, rpn = model.roi_heads, model.rpn
    assert (roi.detections_per_img, roi.score_thresh, roi.nms_thresh) == (321, 0.02, 0.4)
    assert roi.fg_bg_sampler.batch_size_per_image == 64
    assert rpn.nms_thresh == 0.6
    assert rpn._pre_nms_top_n["testing"] == 1500
    assert rpn._post_nms_top_n["training"] == 700


@pytest.mark.parametrize(
    ("norm", "kind"),
    [("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm)],
)
def test_norm_layer(tiny_model, norm: str, kind: type) -> None:
    body = build_model(tiny_model(norm=norm)).backbone.body
    assert isinstance(body.bn1, kind)
    assert isinstance(body.layer4[0].bn2, kind)
    if norm == "gn":
        assert body.bn1.num_groups == 32


@pytest.mark.parametrize("layers", [0, 2, 5])
def test_trainable_layers_freeze_the_first_stages(tiny_model, layers: int) -> None:
    body = build_model(tiny_model(trainable_layers=layers)).backbone.body
    stages = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    for i, stage in enumerate(stages):
        trainable = i >= len(stages) - layers
        assert all(p.requires_grad == trainable for p in getattr(body, stage).parameters()), stage
    assert all(p.requires_grad == (layers == 5) for p in body.bn1.parameters())


def test_resize_policy(tiny_model) -> None:
    image = torch.rand(3, 40, 40)
    keep = build_model(tiny_model(upscale_small=False)).eval()
    enlarge = build_model(tiny_model(upscale_small=True)).eval()
    assert keep.transform([image])[0].image_sizes == [(40, 40)]
    assert enlarge.transform([image])[0].image_sizes == [(64, 64)]
    assert keep.transform([torch.rand(3, 200, 100)])[0].image_sizes == [(64, 32)]  # max_size
    assert keep.transform.image_mean == [0.485, 0.456, 0.406]


@pytest.mark.parametrize(
    ("upscale_small", "shape", "short_side"), [(False, (40, 30), 30), (True, (64, 64), 64)]
)
def test_scale_one_passes_image_and_masks_through_unchanged(
    tiny_model, upscale_small, shape, short_side
) -> None:
    model = build_model(tiny_model(upscale_small=upscale_small)).train()
    image, target = torch.rand(3, *shape), tiny_target()
    target["masks"] = torch.zeros(2, *shape, dtype=torch.uint8)
    target["masks"][0, 5:20, 4:9] = 1
    resized, out = model.transform.resize(image, dict(target))
    assert resized is image and out["masks"] is target["masks"]
    torchvisions = GeneralizedRCNNTransform(short_side, 64, [0.0] * 3, [1.0] * 3).eval()
    reference, ref_target = torchvisions.resize(image, dict(target))
    assert torch.allclose(reference, image, atol=1e-6)
    assert torch.equal(ref_target["masks"], target["masks"])


def test_resize_policy_moves_boxes_in_training(tiny_model) -> None:
    keep = build_model(tiny_model(upscale_small=False, min_size=32, max_size=32)).train()
    _, (target,) = keep.transform([torch.rand(3, 64, 64)], [tiny_target()])
    assert torch.allclose(target["boxes"], tiny_target()["boxes"] / 2)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("backbone", "resnet152", "resnet18"),
        ("norm", "ln", "frozen_bn"),
        ("anchors", "huge", "small"),
        ("trainable_layers", 6, "0..5"),
    ],
)
def test_bad_values_name_the_field(tiny_model, field: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError, match=rf"model\.{field}.*{allowed}"):
        build_model(tiny_model(**{field: value}))


def test_parameter_limit_is_enforced(tiny_model) -> None:
    with torch.device("meta"):  # builds the too-large model without allocating its weights
        with pytest.raises(ConfigError, match="trainable parameters"):
            build_model(tiny_model(mask_head_channels=3000, mask_head_convs=4))  # about 250 M
    huge = nn.Linear(1, 1).to("meta")
    huge.weight = nn.Parameter(torch.empty(MAX_TRAINABLE_PARAMETERS, device="meta"))
    with pytest.raises(ConfigError, match=f"{MAX_TRAINABLE_PARAMETERS + 1:,}"):
        check_parameter_budget(huge)
    huge.weight.requires_grad_(False)
    assert check_parameter_budget(huge) == 1


def test_weights_from_a_resnet_state_dict(tiny_model, tmp_path: Path) -> None:
    resnet = torchvision.models.resnet18()
    torch.nn.init.normal_(resnet.layer4[1].bn2.running_var)
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    body = build_model(tiny_model(norm="frozen_bn", weights=str(path))).backbone.body
    assert torch.equal(body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(body.layer4[1].bn2.running_var, resnet.layer4[1].bn2.running_var)


def test_weights_from_a_mask_rcnn_state_dict(tiny_model, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model(tiny_model())
    path = tmp_path / "full.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_model(tiny_model(weights=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_weights_that_do_not_fit_name_the_file(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ConfigError, match=rf"{path.name}.*shape mismatches"):
        build_model(tiny_model(weights=str(path)))
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(ConfigError, match=r"unexpected keys \['layer1\.2"):
        build_model(tiny_model(weights=str(path)))


def test_missing_weights_file(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing.pth"):
        build_model(tiny_model(weights=str(tmp_path / "nothing.pth")))


def test_imagenet_weights_from_the_cache(tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{free_port()}")  # no network (nobody listens)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConfigError, match=f"{cached}.*'none'"):
        build_model(tiny_model(weights="imagenet"))
    resnet = torchvision.models.resnet18()
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(resnet.state_dict(), cached)
    body = build_model(tiny_model(weights="imagenet")).backbone.body
    assert torch.equal(body.layer2[0].conv1.weight, resnet.layer2[0].conv1.weight)


def test_channels_last_changes_layout_not_results(tiny_model) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model(channels_last=False)).eval()
    fast = build_model(tiny_model(channels_last=True)).eval()
    fast.load_state_dict(model.state_dict())
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        (expected,), (got,) = model([image]), fast([image])
    assert len(got["scores"]) == len(expected["scores"]) > 0
    for key in ("boxes", "scores", "masks"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-3)
