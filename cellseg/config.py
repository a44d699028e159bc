"""Typed configuration: frozen dataclasses loaded from YAML, with dotted overrides.

A config file is a mapping of sections (``data``, ``model``, ``augment``, ``optim``, ``train``);
absent keys keep their defaults, unknown keys and values of the wrong type are errors that name
the key and the file.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cellseg.errors import ConfigError
from cellseg.task import METRICS


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # dataset folder (the DATA.md layout); set with --data, absolute inside Tune
    val_fraction: float = 0.15  # report A's split, fixed for every comparison; 0: no validation (refit)
    split_seed: int = 0  # fixed so every trial of a search is scored on the same images
    num_workers: int = 0  # DataLoader workers; 0 keeps CPU demos and tests single-process
    cache_decoded: bool = True  # decode each tif once: LZW decoding dominates a CPU epoch
    batch_by_orientation: bool = True  # train batches of one orientation pad less (data/batching.py)
    max_pixels: int = 50_000_000  # refuse larger TIFFs from their header; the largest real is 1.8 MP
    max_instances: int = 5000  # refuse images with more; real max ~500, each costs an HxW mask


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"  # reports A and B
    weights: str = "imagenet"  # "imagenet" (downloaded once into $TORCH_HOME), "none" or a .pth file
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"  # frozen BN suits pretrained weights
    trainable_layers: int = 3  # torchvision's default; report B freezes two stages (3 of 5)
    anchors: Literal["default", "small", "tiny", "custom"] = "small"  # report B: 8-128 gave +0.08
    anchor_sizes: tuple[int, ...] = ()  # explicit sizes, one per FPN level, with anchors: custom
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # torchvision's and both reports' ratios
    mask_head_channels: int = 256  # torchvision's width; report B used 512 (+0.01)
    mask_head_convs: int = 4  # torchvision's depth
    mask_head_norm: bool = False  # report B added BatchNorm to the mask head
    rpn_pre_nms_top_n_train: int = 2000  # torchvision default
    rpn_pre_nms_top_n_test: int = 2000  # above torchvision's 1000: images hold up to ~500 cells
    rpn_post_nms_top_n_train: int = 2000  # torchvision default
    rpn_post_nms_top_n_test: int = 2000  # keep enough proposals for 500+ detections
    rpn_nms_thresh: float = 0.7  # torchvision default
    box_score_thresh: float = 0.001  # best public results kept nearly every detection
    box_nms_thresh: float = 0.5  # report B
    detections_per_img: int = 500  # images hold up to 513 cells; 100 throws recall away
    box_batch_size_per_image: int = 512  # torchvision default ROI sampling
    box_head_dim: int = 1024  # torchvision's two-layer box head width; smaller for CPU demos
    min_size: int = 800  # torchvision default short side; the best results enlarged small images
    max_size: int = 1333  # torchvision default long-side cap
    upscale_small: bool = True  # enlarge images whose short side is below min_size
    channels_last: bool = True  # NHWC memory layout: faster convolutions (docs/performance.md)


@dataclass(frozen=True)
class AugmentConfig:
    hflip_p: float = 0.5  # report A
    vflip_p: float = 0.5  # report A
    rot90_p: float = 0.0  # microscopy has no up direction; off until searched
    color_jitter_p: float = 0.0  # report B used 0.9
    color_jitter_strength: float = 0.2  # brightness/contrast/saturation factor range 1 +- this
    dark_shift_p: float = 0.0  # report B used 0.7: intensity shift on dark pixels
    hist_eq_p: float = 0.0  # report B used 0.3
    blur_p: float = 0.0  # report B used 0.5
    blur_sigma: float = 1.0  # upper bound of the Gaussian blur sigma in pixels
    noise_p: float = 0.0  # report B used 0.6
    noise_std: float = 0.03  # Gaussian noise standard deviation on [0, 1] intensities
    scale_crop_p: float = 0.0  # random scale then crop, as the best public results did
    scale_min: float = 0.75  # lower bound of the random scale factor
    scale_max: float = 1.5  # upper bound of the random scale factor
    crop_size: int = 512  # side of the random crop after scaling (smaller images are kept whole)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"  # report A
    lr: float = 0.005  # report A with SGD
    momentum: float = 0.9  # report A; used by sgd only
    weight_decay: float = 5e-4  # report A
    scheduler: Literal["cosine", "plateau", "step", "none"] = "cosine"  # report A
    warmup_epochs: float = 0.5  # linear warmup keeps early Mask R-CNN losses finite
    step_size: int = 8  # epochs between decays for scheduler: step
    gamma: float = 0.1  # decay factor for scheduler: step
    plateau_patience: int = 3  # report B
    plateau_factor: float = 0.5  # report B
    grad_clip: float = 0.0  # max gradient norm, 0 = off; report B clipped at 1.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12  # report A trained 10-15 epochs
    batch_size: int = 2  # both reports; Mask R-CNN on large images fills a GPU at 2
    seed: int = 0  # seeds the model init, augmentation and loader order
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    amp: bool = True  # bf16 training on CUDA and bf16 CPUs, float32 boxes and scores; export in float32
    amp_validation: bool = False  # validation predicts in bf16 too, else float32 (docs/performance.md)
    output_dir: str = "runs"  # checkpoints go to <output_dir>/<run name>/
    eval_every: int = 1  # validate every N epochs and the last; ASHA decides at validated epochs
    max_eval_images: int = 0  # 0 = the whole validation split
    val_loss: bool = False  # also report val_loss: a second forward pass per validation batch
    metric: str = "segm_AP50"  # the leaderboard's metric, also the search objective (task.METRICS)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` converted to the annotated type ``hint`` or raise ConfigError naming key."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: no conversion for fields of type {hint!r}")  # a new field type


def field_types(section: str) -> dict[str, Any]:
    """The annotated type of every key of one section, by key name."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; sections are {', '.join(SECTIONS)}")
    return typing.get_type_hints(SECTIONS[section])


def _build_section(section: str, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}{section}: expected a mapping of keys, got {values!r}")
    hints = field_types(section)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}unknown key {section}.{key}; valid keys: {', '.join(sorted(hints))}")
        kwargs[key] = _coerce(value, hints[key], f"{where}{section}.{key}")
    return SECTIONS[section](**kwargs)


def config_from_dict(raw: Mapping[str, Any], where: str = "") -> Config:
    """Build a Config from a nested mapping; ``where`` prefixes error messages (a file name)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}expected a mapping of sections, got {type(raw).__name__}")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{where}unknown section {section!r}; sections are {', '.join(SECTIONS)}")
    cfg = Config(**{s: _build_section(s, raw.get(s, {}), where) for s in raw})
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The nested plain-dict form of a config (tuples as lists), the inverse of config_from_dict."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted keys to values: {"optim.lr": 0.005, ...}."""
    return {f"{s}.{k}": v for s, sub in config_to_dict(cfg).items() for k, v in sub.items()}


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value`` and read the value as YAML (so 1e-3, true, [8, 16] have their types)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | list[str]) -> Config:
    """A new config with dotted keys replaced; a list of ``key=value`` strings is parsed first."""
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    nested = config_to_dict(cfg)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(
                f"unknown key {key!r}: keys look like section.name with a section of {', '.join(SECTIONS)}"
            )
        if name not in nested[section]:
            raise ConfigError(
                f"unknown key {key!r}; valid keys of {section}: {', '.join(sorted(nested[section]))}"
            )
        nested[section][name] = value
    return config_from_dict(nested)


def load_config(path: str | Path, overrides: Mapping[str, Any] | list[str] = ()) -> Config:
    """Read a YAML config file (safe_load) and apply dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    cfg = config_from_dict(raw, where=f"{path}: ")
    return apply_overrides(cfg, overrides) if overrides else cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Value checks the types cannot express; each message names the key."""
    d, m, a, o, t = cfg.data, cfg.model, cfg.augment, cfg.optim, cfg.train
    _check(
        0.0 <= d.val_fraction < 1.0,
        "data.val_fraction must lie in [0, 1) (0: train on every image without validation)",
    )
    _check(d.num_workers >= 0, "data.num_workers must be >= 0")
    _check(
        d.max_pixels > 0 and d.max_instances > 0, "data.max_pixels and data.max_instances must be positive"
    )
    _check(0 <= m.trainable_layers <= 5, "model.trainable_layers must lie in 0..5")
    _check(
        (m.anchors == "custom") == bool(m.anchor_sizes),
        "model.anchor_sizes must be given exactly when model.anchors is 'custom'",
    )
    _check(all(s > 0 for s in m.anchor_sizes), "model.anchor_sizes must be positive")
    _check(
        bool(m.aspect_ratios) and all(r > 0 for r in m.aspect_ratios),
        "model.aspect_ratios must be a non-empty list of positive numbers",
    )
    _check(
        m.mask_head_channels > 0 and m.mask_head_convs > 0,
        "model.mask_head_channels and model.mask_head_convs must be positive",
    )
    _check(
        m.detections_per_img > 0 and m.box_head_dim > 0,
        "model.detections_per_img and model.box_head_dim must be positive",
    )
    _check(0 < m.min_size <= m.max_size, "model.min_size must be positive and <= model.max_size")
    for name in ("box_score_thresh", "box_nms_thresh", "rpn_nms_thresh"):
        _check(0.0 <= getattr(m, name) <= 1.0, f"model.{name} must lie in [0, 1]")
    for f in dataclasses.fields(a):
        if f.name.endswith("_p"):
            _check(0.0 <= getattr(a, f.name) <= 1.0, f"augment.{f.name} must lie in [0, 1]")
    _check(0 < a.scale_min <= a.scale_max, "augment.scale_min must be positive and <= scale_max")
    _check(0.0 <= a.color_jitter_strength < 1.0, "augment.color_jitter_strength must lie in [0, 1)")
    _check(a.blur_sigma >= 0.1, "augment.blur_sigma must be at least 0.1 (pixels)")
    _check(a.noise_std >= 0, "augment.noise_std must be >= 0")
    _check(a.crop_size >= 32, "augment.crop_size must be at least 32")
    _check(o.lr > 0, "optim.lr must be positive")
    _check(o.weight_decay >= 0 and o.grad_clip >= 0, "optim.weight_decay and grad_clip must be >= 0")
    _check(
        0 < o.gamma <= 1 and 0 < o.plateau_factor < 1,
        "optim.gamma must lie in (0, 1] and optim.plateau_factor in (0, 1)",
    )
    _check(
        o.step_size > 0 and o.warmup_epochs >= 0,
        "optim.step_size must be positive and optim.warmup_epochs >= 0",
    )
    _check(
        t.epochs > 0 and t.batch_size > 0 and t.eval_every > 0,
        "train.epochs, train.batch_size and train.eval_every must be positive",
    )
    _check(
        t.metric in METRICS,
        f"train.metric: {t.metric!r} is not a metric evaluation reports; use one of {', '.join(METRICS)}",
    )
