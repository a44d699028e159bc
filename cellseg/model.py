"""Build the Mask R-CNN: backbone, normalisation, anchors, heads, resize policy and weights.

The one module that knows torchvision's detection API; everything is chosen by ``ModelConfig``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from cellseg.config import ModelConfig
from cellseg.errors import ConfigError
from cellseg.input_scale import model_scale, resize_image, resize_masks
from cellseg.mask_upsample import MaskUpsample
from cellseg.roi_align import CellRoIAlign
from cellseg.task import NUM_CLASSES
from cellseg.torchvision_private import BoxCoder, resize_boxes
from cellseg.weights import IMAGENET, read_state_dict, resolve_weights

MAX_TRAINABLE_PARAMETERS = 200_000_000  # task rule: fewer than 200 M trainable parameters

ANCHOR_SIZES: dict[str, tuple[int, ...]] = {
    "default": (32, 64, 128, 256, 512),  # torchvision's
    "small": (8, 16, 32, 64, 128),  # report B
    "tiny": (4, 8, 16, 32, 64),
}
FPN_LEVELS = 5  # outputs of torchvision's ResNet-FPN: four stages plus the max-pooled level
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # absent with GroupNorm


class Float32GroupNorm(nn.GroupNorm):
    """torch's GroupNorm, computed in float32 for a CPU's bf16 input in a training step
    (``train.amp``), as CUDA's autocast runs it.

    The CPU's autocast runs group_norm in bf16, whose backward pass over a channels-last map takes
    torch's slow path: 14.9 ms for the demo stem's 2x64x96x80 map, 4.7 ms in float32 (one thread).
    The output goes back to bf16, as the next layers expect. Without gradients (predictions) the
    bf16 forward pass is the faster one and stays.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and torch.is_grad_enabled():
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


def _group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, fewer when the channel count is not a multiple of 32."""
    return Float32GroupNorm(math.gcd(32, num_channels), num_channels)


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "gn": _group_norm,
}

T = TypeVar("T")


def _choose(table: Mapping[str, T], value: str, field: str) -> T:
    if value not in table:
        raise ConfigError(f"model.{field}: {value!r} is not one of {', '.join(map(repr, table))}")
    return table[value]


class CellTransform(GeneralizedRCNNTransform):
    """torchvision's transform, optionally never enlarging an image (scale capped at 1).

    When the resize would keep the size (scale 1, as for samples the training dataset already
    shrank) the image and its masks pass through untouched: torchvision would still interpolate
    them, converting every instance mask to float (N x H x W x 4 bytes). Otherwise it resizes as
    torchvision does (``cellseg.input_scale``).
    """

    def __init__(
        self,
        min_size: int,
        max_size: int,
        image_mean: list[float],
        image_std: list[float],
        *,
        upscale_small: bool,
    ) -> None:
        super().__init__(min_size, max_size, image_mean, image_std)
        self.upscale_small = upscale_small

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        h, w = image.shape[-2:]
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        if not self.upscale_small:
            size = min(size, h, w)
        scale = model_scale(h, w, size, self.max_size)
        if (math.floor(h * scale), math.floor(w * scale)) == (h, w):
            return image, target
        image = resize_image(image, scale)
        if target is not None:
            if "masks" in target:
                target["masks"] = resize_masks(target["masks"], scale)
            target["boxes"] = resize_boxes(target["boxes"], [h, w], list(image.shape[-2:]))
        return image, target


class Float32BoxCoder(BoxCoder):
    """torchvision's box coder, decoding in float32 whatever the deltas' dtype.

    torchvision's ``decode`` casts the anchors or proposals to the deltas' dtype: under bf16
    autocast (8 mantissa bits) a coordinate between 512 and 1024 px is rounded to a 4 px step,
    a quarter of a cell. Proposals and final boxes stay float32 here.
    """

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        with torch.autocast(rel_codes.device.type, enabled=False):
            return super().decode(rel_codes.float(), [b.float() for b in boxes])


class Float32Predictor(FastRCNNPredictor):
    """torchvision's box predictor, computing class logits and box deltas in float32.

    Under bf16 autocast its linear layers would give bf16 logits, and on a CPU (whose autocast
    keeps softmax in bf16) bf16 scores, on steps of 1/256 above 0.5: detections scoring 0.989 and
    0.990 would tie, and ties change the order in which COCO's AP counts detections. The layers are
    a few thousand multiply-adds per region; training steps under ``train.amp`` run them in
    float32 too."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _float32_box_coder(coder: BoxCoder) -> Float32BoxCoder:
    return Float32BoxCoder(coder.weights, coder.bbox_xform_clip)


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_parameter_budget(model: nn.Module) -> int:
    """Return the trainable-parameter count; ConfigError when it reaches the task's limit."""
    count = count_trainable_parameters(model)
    if count >= MAX_TRAINABLE_PARAMETERS:
        raise ConfigError(
            f"the model has {count:,} trainable parameters; the task allows fewer than "
            f"{MAX_TRAINABLE_PARAMETERS:,} (reduce model.mask_head_channels, model.backbone "
            "or model.trainable_layers)"
        )
    return count


def _anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    if cfg.anchors == "custom":
        sizes = cfg.anchor_sizes
        if len(sizes) != FPN_LEVELS:
            raise ConfigError(
                f"model.anchor_sizes: got {len(sizes)} sizes, need exactly {FPN_LEVELS} (one per FPN level)"
            )
    else:
        sizes = _choose(ANCHOR_SIZES, cfg.anchors, "anchors")
    ratios = tuple(float(r) for r in cfg.aspect_ratios)
    return AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * len(sizes))


def _ignorable(key: str) -> bool:
    """Keys a file may hold that the model lacks: the ImageNet classifier, BatchNorm statistics."""
    return key.startswith("fc.") or key.endswith(BN_STATISTICS)


def _load_into(module: nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    """Copy ``state`` into ``module``: every key must match in name and shape but _ignorable ones."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not _ignorable(k)]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"model.weights: {source} does not fit this model ({type(module).__name__}); "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(mismatched)} shape mismatches (file vs model) {mismatched[:3]}"
        )
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def _load_weights(model: MaskRCNN, cfg: ModelConfig) -> None:
    path = resolve_weights(cfg.weights, cfg.backbone)
    if path is None:
        return
    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state):
        _load_into(model, state, path)
    else:
        _load_into(model.backbone.body, state, path)


def _mask_predictor(channels: int, classes: int) -> MaskRCNNPredictor:
    """torchvision's mask predictor, its upsampling computed as cellseg.mask_upsample does."""
    predictor = MaskRCNNPredictor(channels, channels, classes)
    predictor.conv5_mask = MaskUpsample.of(predictor.conv5_mask)
    return predictor


def _backbone(cfg: ModelConfig) -> BackboneWithFPN:
    _choose(IMAGENET, cfg.backbone, "backbone")  # the backbones with ImageNet weights
    norm_layer = _choose(NORM_LAYERS, cfg.norm, "norm")
    if not 0 <= cfg.trainable_layers <= 5:
        raise ConfigError(f"model.trainable_layers: {cfg.trainable_layers} is not in 0..5")
    return resnet_fpn_backbone(
        backbone_name=cfg.backbone, weights=None, norm_layer=norm_layer, trainable_layers=cfg.trainable_layers
    )


def build_model(cfg: ModelConfig, *, num_classes: int = NUM_CLASSES) -> MaskRCNN:
    """Mask R-CNN with a ResNet-FPN backbone for ``num_classes`` foreground classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    backbone = _backbone(cfg)
    anchors = _anchor_generator(cfg)
    channels = cfg.mask_head_channels
    pool_side = 7  # torchvision's box RoIAlign output size (14 for masks), sampling ratio 2
    levels = [str(level) for level in range(FPN_LEVELS - 1)]  # RoIs pool from all but the max-pooled level
    mask_head = MaskRCNNHeads(
        backbone.out_channels,
        [channels] * cfg.mask_head_convs,
        1,
        norm_layer=nn.BatchNorm2d if cfg.mask_head_norm else None,
    )
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        box_roi_pool=CellRoIAlign(levels, pool_side, sampling_ratio=2),
        box_head=TwoMLPHead(backbone.out_channels * pool_side**2, cfg.box_head_dim),
        box_predictor=Float32Predictor(cfg.box_head_dim, num_classes + 1),
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        mask_roi_pool=CellRoIAlign(levels, 2 * pool_side, sampling_ratio=2),
        mask_head=mask_head,
        mask_predictor=_mask_predictor(channels, num_classes + 1),
    )
    t = model.transform
    model.rpn.box_coder = _float32_box_coder(model.rpn.box_coder)
    model.roi_heads.box_coder = _float32_box_coder(model.roi_heads.box_coder)
    model.transform = CellTransform(
        cfg.min_size, cfg.max_size, t.image_mean, t.image_std, upscale_small=cfg.upscale_small
    )
    check_parameter_budget(model)
    _load_weights(model, cfg)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model
