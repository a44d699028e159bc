"""Paired augmentations: alignment of image and label maps, ids, ranges, determinism, pickling."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from cellseg.config import AugmentConfig, Config, ConfigError, apply_overrides
from cellseg.data.augment import build_augment

PROBABILITIES = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")]
OFF = AugmentConfig(**{name: 0.0 for name in PROBABILITIES})
GEOMETRIC = ["hflip_p", "vflip_p", "rot90_p"]
PHOTOMETRIC = ["color_jitter_p", "dark_shift_p", "hist_eq_p", "blur_p", "noise_p"]


def only(name: str, **changes) -> AugmentConfig:
    return dataclasses.replace(OFF, **{name: 1.0}, **changes)


def label_maps(h: int = 48, w: int = 40) -> np.ndarray:
    """Four class maps with non-contiguous ids, some above 255, and an empty class."""
    maps = np.zeros((4, h, w), dtype=np.int32)
    maps[0, 4:12, 4:14] = 300
    maps[0, 20:30, 6:12] = 7
    maps[1, 30:44, 20:36] = 1000
    maps[3, 2:10, 25:38] = 256
    return maps


def paint(maps: np.ndarray) -> np.ndarray:
    """An image that encodes each pixel's ids, so alignment can be checked exactly."""
    return (np.stack([maps[0], maps[1], maps[3]], axis=-1) / 1000).astype(np.float32)


def instances(maps: np.ndarray) -> set[tuple[int, int]]:
    return {(c, int(i)) for c in range(len(maps)) for i in np.unique(maps[c]) if i}


def check_output(image: np.ndarray, maps: np.ndarray) -> None:
    assert image.dtype == np.float32 and maps.dtype == np.int32
    assert image.flags.c_contiguous and maps.flags.c_contiguous
    assert image.shape[:2] == maps.shape[1:] and image.shape[2] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_all_probabilities_zero_means_no_augmentation() -> None:
    assert build_augment(OFF) is None
    assert build_augment(AugmentConfig()) is not None


@pytest.mark.parametrize("name", GEOMETRIC)
@pytest.mark.parametrize("seed", range(4))
def test_geometric_transforms_keep_image_and_labels_aligned(name: str, seed: int) -> None:
    maps = label_maps()
    image, out = build_augment(only(name))(paint(maps), maps, np.random.default_rng(seed))
    check_output(image, out)
    assert np.array_equal(image, paint(out))
    assert instances(out) == instances(maps)
    assert image.shape != (48, 40, 3) or not np.array_equal(image, paint(maps))


def test_rot90_uses_every_quarter_turn() -> None:
    aug, maps = build_augment(only("rot90_p")), label_maps()
    shapes = {aug(paint(maps), maps, np.random.default_rng(s))[1].shape for s in range(20)}
    assert shapes == {(4, 48, 40), (4, 40, 48)}


@pytest.mark.parametrize("seed", range(4))
def test_scale_crop_keeps_labels_aligned_within_a_pixel(seed: int) -> None:
    maps = label_maps()
    foreground = (maps.max(axis=0) > 0).astype(np.float32)
    image = np.repeat(foreground[..., None], 3, axis=-1)
    cfg = only("scale_crop_p", scale_min=1.5, scale_max=2.0, crop_size=32)
    image, out = build_augment(cfg)(image, maps, np.random.default_rng(seed))
    check_output(image, out)
    assert out.shape == (4, 32, 32)
    inside = out.max(axis=0) > 0
    assert (image[inside] > 0).all() and (image[~inside] < 1).all()
    assert instances(out) <= instances(maps)


def test_scale_crop_can_drop_instances_and_keeps_small_images_whole() -> None:
    maps = label_maps()
    crop = build_augment(only("scale_crop_p", scale_min=1.5, scale_max=2.0, crop_size=32))
    kept = [instances(crop(paint(maps), maps, np.random.default_rng(s))[1]) for s in range(8)]
    assert any(len(k) < len(instances(maps)) for k in kept)
    shrink = build_augment(only("scale_crop_p", scale_min=0.5, scale_max=0.5, crop_size=512))
    image, out = shrink(paint(maps), maps, np.random.default_rng(0))
    assert image.shape == (24, 20, 3) and out.shape == (4, 24, 20)
    assert instances(out) == instances(maps)


def test_everything_on_with_empty_label_maps() -> None:
    cfg = AugmentConfig(**{name: 1.0 for name in PROBABILITIES}, crop_size=32)
    maps = np.zeros((4, 40, 50), dtype=np.int32)
    image = np.random.default_rng(0).random((40, 50, 3), dtype=np.float32)
    image, out = build_augment(cfg)(image, maps, np.random.default_rng(1))
    check_output(image, out)
    assert not out.any()


@pytest.mark.parametrize("name", PHOTOMETRIC)
def test_photometric_transforms_change_only_the_image(name: str) -> None:
    maps = label_maps()
    image = np.random.default_rng(0).random((48, 40, 3), dtype=np.float32)
    out_image, out_maps = build_augment(only(name))(image, maps, np.random.default_rng(1))
    check_output(out_image, out_maps)
    assert not np.array_equal(out_image, image)
    assert np.array_equal(out_maps, label_maps())


def test_inputs_are_never_modified() -> None:
    cfg = AugmentConfig(**{name: 1.0 for name in PROBABILITIES}, crop_size=32)
    maps = label_maps()
    image = np.random.default_rng(0).random((48, 40, 3), dtype=np.float32)
    before = image.copy()
    build_augment(cfg)(image, maps, np.random.default_rng(0))
    assert np.array_equal(image, before) and np.array_equal(maps, label_maps())


def test_same_seed_same_result_and_pickling() -> None:
    cfg = AugmentConfig(**{name: 0.5 for name in PROBABILITIES}, crop_size=32)
    aug, maps = build_augment(cfg), label_maps()
    image = np.random.default_rng(0).random((48, 40, 3), dtype=np.float32)
    copy = pickle.loads(pickle.dumps(aug))
    first = aug(image, maps, np.random.default_rng(7))
    again = copy(image, maps, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    others = [aug(image, maps, np.random.default_rng(s))[0] for s in range(5)]
    assert any(o.shape != first[0].shape or not np.array_equal(o, first[0]) for o in others)


@pytest.mark.parametrize(
    ("field", "value"),
    [("color_jitter_strength", 1.5), ("blur_sigma", 0.01), ("noise_std", -0.1)],
)
def test_bad_parameters_fail_when_the_config_loads(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"augment.{field}"):
        apply_overrides(Config(), {f"augment.{field}": value})
