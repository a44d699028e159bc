"""Paired augmentations of an image and its per-class instance-id maps.

Every transform maps ``(image, label_maps, rng) -> (image, label_maps)`` (parameters are bound
with ``functools.partial``, which pickles for loader workers) where ``image`` is
float32 (H, W, 3) in [0, 1] and ``label_maps`` is int32 (C, H, W), one instance-id map per class.
Geometric transforms move the label maps with the image (nearest neighbour, ids never mixed);
photometric ones leave them untouched. Inputs are never modified in place (the dataset may cache
them). Boxes, labels and masks are derived from the label maps afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import ndimage
from skimage.exposure import equalize_hist

from cellseg.config import AugmentConfig

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luminance weights
HUE_TURNS_PER_STRENGTH = 0.25  # hue shift range, in turns of the colour wheel, per unit strength
DARK_THRESHOLD = 0.4  # luminance below which a pixel counts as dark (stained nuclei)
DARK_SHIFT_MAX = 0.1  # dark pixels are shifted by an amount uniform in +- this


def hflip(
    image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left to right."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label_maps[:, :, ::-1])


def vflip(
    image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror top to bottom."""
    return np.ascontiguousarray(image[::-1]), np.ascontiguousarray(label_maps[:, ::-1])


def rot90(
    image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by 90, 180 or 270 degrees."""
    k = int(rng.integers(1, 4))
    return (
        np.ascontiguousarray(np.rot90(image, k, axes=(0, 1))),
        np.ascontiguousarray(np.rot90(label_maps, k, axes=(1, 2))),
    )


def scale_crop(
    image: np.ndarray,
    label_maps: np.ndarray,
    rng: np.random.Generator,
    *,
    scale_min: float,
    scale_max: float,
    crop_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale by a factor uniform in [scale_min, scale_max], then crop sides above crop_size."""
    f = rng.uniform(scale_min, scale_max)
    h, w = image.shape[:2]
    scaled_h, scaled_w = max(round(h * f), 1), max(round(w * f), 1)
    crop_h, crop_w = min(scaled_h, crop_size), min(scaled_w, crop_size)
    y = int(rng.integers(0, scaled_h - crop_h + 1))
    x = int(rng.integers(0, scaled_w - crop_w + 1))
    # Only the crop is computed: output pixel o samples the input at (o + 0.5) * step - 0.5.
    steps = (h / scaled_h, w / scaled_w)
    rows, cols = (
        np.minimum(((start + np.arange(size) + 0.5) * step).astype(np.intp), length - 1)
        for start, size, step, length in zip((y, x), (crop_h, crop_w), steps, (h, w))
    )
    image = ndimage.affine_transform(
        image,
        (*steps, 1.0),
        offset=((y + 0.5) * steps[0] - 0.5, (x + 0.5) * steps[1] - 0.5, 0.0),
        output_shape=(crop_h, crop_w, image.shape[2]),
        order=1,
        mode="nearest",
    )
    label_maps = np.ascontiguousarray(label_maps[:, rows[:, None], cols[None, :]])
    return np.clip(image, 0.0, 1.0), label_maps


def _hue_rotation(turns: float) -> np.ndarray:
    """3x3 matrix rotating RGB colours about the grey axis by ``turns`` of a full circle."""
    angle = 2 * np.pi * turns
    k = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    cos, sin = np.cos(angle), np.sin(angle)
    return (cos * np.eye(3) + sin * cross + (1 - cos) * np.outer(k, k)).astype(np.float32)


def color_jitter(
    image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator, *, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Brightness, contrast and saturation factors in 1 +- strength, then a small hue rotation."""
    factors = rng.uniform(1 - strength, 1 + strength, 3).astype(np.float32)
    brightness, contrast, saturation = factors
    turns = float(rng.uniform(-1, 1)) * strength * HUE_TURNS_PER_STRENGTH
    out = image * brightness
    mean = np.float32((out @ LUMA).mean())
    out = mean + contrast * (out - mean)
    grey = (out @ LUMA)[..., None]
    out = grey + saturation * (out - grey)
    out = out @ _hue_rotation(turns).T
    return np.clip(out, 0.0, 1.0), label_maps


def dark_shift(
    image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shift the intensity of pixels darker than DARK_THRESHOLD by one random amount."""
    shift = np.float32(rng.uniform(-DARK_SHIFT_MAX, DARK_SHIFT_MAX))
    dark = (image @ LUMA < DARK_THRESHOLD)[..., None]
    return np.clip(np.where(dark, image + shift, image), 0.0, 1.0), label_maps


def hist_eq(
    image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram equalisation of each colour channel."""
    channels = [equalize_hist(image[..., c]) for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1).astype(np.float32), label_maps


def gaussian_blur(
    image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator, *, max_sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blur with sigma uniform in (0.1, max_sigma) pixels."""
    sigma = rng.uniform(0.1, max_sigma)
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0)), label_maps


def gaussian_noise(
    image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator, *, std: float
) -> tuple[np.ndarray, np.ndarray]:
    """Additive Gaussian noise of standard deviation std, clipped to [0, 1]."""
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
    return np.clip(image + noise, 0.0, 1.0), label_maps


@dataclass(frozen=True)
class Compose:
    """Apply each transform with its own probability, in order (picklable for loader workers)."""

    steps: tuple[tuple[float, Transform], ...]

    def __call__(
        self, image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        for p, transform in self.steps:
            if rng.random() < p:
                image, label_maps = transform(image, label_maps, rng)
        return image, label_maps


def build_augment(cfg: AugmentConfig) -> Compose | None:
    """The configured pipeline (geometric first, then photometric); None when every p is 0."""
    steps: tuple[tuple[float, Transform], ...] = (
        (
            cfg.scale_crop_p,
            partial(scale_crop, scale_min=cfg.scale_min, scale_max=cfg.scale_max, crop_size=cfg.crop_size),
        ),
        (cfg.hflip_p, hflip),
        (cfg.vflip_p, vflip),
        (cfg.rot90_p, rot90),
        (cfg.color_jitter_p, partial(color_jitter, strength=cfg.color_jitter_strength)),
        (cfg.dark_shift_p, dark_shift),
        (cfg.hist_eq_p, hist_eq),
        (cfg.blur_p, partial(gaussian_blur, max_sigma=cfg.blur_sigma)),
        (cfg.noise_p, partial(gaussian_noise, std=cfg.noise_std)),
    )
    active = tuple((p, t) for p, t in steps if p > 0)
    return Compose(active) if active else None
