"""Property-based tests (hypothesis): the config loader on arbitrary YAML, and the RLE round trip
from a binary mask to the JSON a submission holds and back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_utils

from cellseg.config import Config, ConfigError, load_config
from cellseg.evaluation import ImagePrediction, coco_results
from cellseg.rle import encode_mask, encode_region

SECTIONS = {
    f.name: [g.name for g in dataclasses.fields(getattr(Config(), f.name))]
    for f in dataclasses.fields(Config)
}
SCALARS = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=12)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
KNOWN_OR_NOT = st.sampled_from([k for keys in SECTIONS.values() for k in keys]) | st.text(max_size=8)
DOCUMENTS = (
    st.dictionaries(
        st.sampled_from(sorted(SECTIONS)) | st.text(max_size=8),
        st.dictionaries(KNOWN_OR_NOT, VALUES, max_size=4) | VALUES,
        max_size=4,
    )
    | VALUES
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS)
def test_loader_gives_a_valid_config_or_one_config_error(tmp_path: Path, document) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}"), exc
        return
    assert isinstance(cfg, Config)


def test_loader_refuses_python_tags(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


MASKS = st.tuples(st.integers(1, 48), st.integers(1, 48)).flatmap(lambda shape: arrays(np.bool_, shape))


@settings(max_examples=300, deadline=None)
@given(mask=MASKS)
def test_rle_round_trip_through_submission_json(mask: np.ndarray) -> None:
    rle = encode_mask(mask)
    assert rle["size"] == list(mask.shape)
    prediction = ImagePrediction(
        boxes=np.zeros((1, 4), np.float32),
        labels=np.array([2]),
        scores=np.array([0.5], np.float32),
        rles=[rle],
    )
    [entry] = json.loads(json.dumps(coco_results(7, prediction)))
    segmentation = {
        "size": entry["segmentation"]["size"],
        "counts": entry["segmentation"]["counts"].encode("ascii"),
    }
    assert np.array_equal(mask_utils.decode(segmentation).astype(bool), mask)
    assert int(mask_utils.area(segmentation)) == int(mask.sum())


@st.composite
def regions_in_images(draw: st.DrawFn) -> tuple[np.ndarray, int, int, tuple[int, int]]:
    """A mask region (possibly empty or the whole image) and where it sits in an image."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rows, cols = draw(st.integers(0, height)), draw(st.integers(0, width))
    top, left = draw(st.integers(0, height - rows)), draw(st.integers(0, width - cols))
    return draw(arrays(np.bool_, (rows, cols))), top, left, (height, width)


@settings(max_examples=500, deadline=None)
@given(case=regions_in_images())
def test_region_rle_equals_full_image_rle(case) -> None:
    region, top, left, (height, width) = case
    full = np.zeros((height, width), dtype=bool)
    full[top : top + region.shape[0], left : left + region.shape[1]] = region
    assert encode_region(region, top, left, (height, width)) == encode_mask(full)
