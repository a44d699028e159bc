"""Inference settings on cached predictions (cellseg.inference_settings, cellseg.prediction_cache,
cellseg.settings_space) against the model's own prediction, on a tiny random Mask R-CNN whose own
confident detections serve as ground truth, so that AP50 is neither 0 nor 1."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
import torch

from cellseg.config import ModelConfig
from cellseg.errors import ConfigError, DataError
from cellseg.evaluation import coco_metrics, truth_from_masks
from cellseg.inference_settings import (
    CacheSettings,
    InferenceSettings,
    apply_settings,
    parse_scales,
    predict_with_settings,
    predicting_loosely,
    read_members,
    read_settings,
    scales_label,
    write_settings,
)
from cellseg.model import build_model
from cellseg.predict import Detections, predict_images
from cellseg.prediction_cache import build_cache, cache_bound_bytes
from cellseg.settings_space import SettingsSpace, grid_values, scale_sets, suggest_settings
from search.tune_inference import settings_study

SIZES = [(60, 80), (50, 90)]
ALL = CacheSettings(score_threshold=0.0, nms_iou=1.0, detections=120)


@pytest.fixture(scope="module")
def model_cfg(tiny_model) -> ModelConfig:
    return tiny_model(
        norm="gn",
        anchors="small",
        rpn_pre_nms_top_n_test=60,
        rpn_post_nms_top_n_test=30,  # at most 30 x 4 class-specific boxes: a cache of 120 holds all
        detections_per_img=40,
        max_size=128,
    )


@pytest.fixture(scope="module")
def model(model_cfg) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(model_cfg).eval()


@pytest.fixture(scope="module")
def other(model_cfg) -> torch.nn.Module:
    """A second random model: the other member of a two-model ensemble."""
    torch.manual_seed(4)
    return build_model(model_cfg).eval()


@pytest.fixture(scope="module")
def dataset(model) -> list[tuple[torch.Tensor, dict]]:
    """Random images whose 'truth' is the model's own 8 best detections at 0.5, shifted a little."""
    generator = torch.Generator().manual_seed(0)
    items = []
    for index, size in enumerate(SIZES):
        image = torch.rand(3, *size, generator=generator)
        [own] = predict_images(model, [image], mask_threshold=0.5)
        masks = torch.stack(
            [torch.from_numpy(_decode(rle)) for rle in own.rles[:8] if _decode(rle).any()]
        ).roll(1, dims=-1)
        items.append(
            (image, {"masks": masks, "labels": torch.as_tensor(own.labels[: len(masks)]), "image_id": index})
        )
    return items


def _decode(rle: dict):
    from pycocotools import mask as mask_utils

    return mask_utils.decode(rle).astype("uint8")


def direct_ap50(model, dataset, settings: InferenceSettings) -> tuple[float, list]:
    """AP50 of the model's own prediction (its own NMS) with its score threshold, NMS IoU, cap and
    input size set to those of ``settings``."""
    own = CacheSettings(settings.score_threshold, settings.nms_iou, settings.detections)
    [scale] = settings.scales
    with predicting_loosely(model, own, scale):
        predictions = {
            target["image_id"]: predict_images(model, [image], mask_threshold=settings.mask_threshold)[0]
            for image, target in dataset
        }
    truths = [truth_from_masks(t["image_id"], t["masks"].numpy(), t["labels"].numpy()) for _, t in dataset]
    ap50 = coco_metrics(truths, predictions, max_dets=120, iou_types=("segm",))["segm_AP50"]
    return ap50, list(predictions.values())


@pytest.mark.parametrize(
    ("cache", "settings"),
    [
        (ALL, dict(score_threshold=0.2, nms_iou=0.5, detections=15, mask_threshold=0.4)),
        (ALL, dict(score_threshold=0.0, nms_iou=0.3, detections=120, mask_threshold=0.6, scales=(1.5,))),
        (  # a cache suppressed at the setting's own IoU: exact as well
            CacheSettings(nms_iou=0.5, detections=40),
            dict(score_threshold=0.1, nms_iou=0.5, detections=25, mask_threshold=0.5),
        ),
    ],
)
def test_the_cache_reproduces_the_models_own_prediction(model, dataset, cache, settings):
    settings = InferenceSettings(cache=cache, **settings)
    built = build_cache([model], dataset, cache=cache, scales=(1.0, 1.5), flips=(), progress=False)
    expected, predictions = direct_ap50(model, dataset, settings)
    for index, prediction in enumerate(predictions):
        found = apply_settings(built.image_passes(settings, index), settings)
        assert found.labels.tolist() == prediction.labels.tolist()
        assert torch.allclose(found.scores, torch.from_numpy(prediction.scores))
        assert torch.allclose(found.boxes, torch.from_numpy(prediction.boxes), atol=1e-4)
    if settings.scales == (1.0,):  # the truth is the model's own at scale 1, shifted: some hits, some misses
        assert 0 < expected < 1
    assert built.ap50(settings) == pytest.approx(expected, abs=1e-3)  # float16 masks in the cache


@pytest.mark.parametrize(
    ("scales", "flips", "members"),
    [((1.25,), ("hflip", "vflip"), 1), ((1.0, 1.25), (), 2)],  # merged scales, an ensemble
)
def test_export_applies_what_the_cache_scored(model, model_cfg, other, dataset, scales, flips, members):
    """predict_with_settings (export's path) gives the AP50 the search measured: flips, merged
    scales and an ensemble included."""
    cache = CacheSettings(nms_iou=0.7, detections=60)
    models = [model, other][:members]
    settings = InferenceSettings(
        scales=scales,
        flips=flips,
        models=members,
        merge_iou=0.5,
        score_threshold=0.05,
        nms_iou=0.4,
        detections=30,
        class_agnostic=True,
        cache=cache,
    )
    built = build_cache(models, dataset, cache=cache, scales=(1.0, 1.25), flips=flips, progress=False)
    assert len(built.image_passes(settings, 0)) == settings.passes == members * len(scales) * (1 + len(flips))
    predictions = {t["image_id"]: predict_with_settings(models, image, settings) for image, t in dataset}
    exported = coco_metrics(built.truths, predictions, max_dets=60, iou_types=("segm",))["segm_AP50"]
    assert built.ap50(settings) == pytest.approx(exported, abs=1e-3)
    assert model.roi_heads.detections_per_img == model_cfg.detections_per_img  # the model is restored
    assert model.transform.min_size == (model_cfg.min_size,)


def test_the_cache_is_refused_above_its_bound_before_any_prediction(model, other):
    """The bound counts models x scales x views: two models need twice one model's."""

    class Unreadable(list):
        def __iter__(self):
            raise AssertionError("predicted before checking the bound")

    bound = cache_bound_bytes(passes=12, images=3, detections=120, side=28)
    assert bound == 12 * 3 * 120 * (28 * 28 * 2 + 32)
    request = dict(cache=ALL, scales=(1.0, 1.5), flips=("hflip", "vflip"), max_bytes=bound - 1)
    with pytest.raises(ConfigError, match="2 model\\(s\\) x 2 scale\\(s\\) x 3 view.*--ensemble"):
        build_cache([model, other], Unreadable([None] * 3), **request)
    with pytest.raises(AssertionError, match="predicted"):  # one model: half the bound, allowed
        build_cache([model], Unreadable([None] * 3), **request)


def test_an_ensemble_of_one_model_equals_the_model(model, other, dataset):
    """In a two-member cache, size 1 scores what the best member alone scores, and the model
    merged with itself scores what it scores alone; merged scales {1} are scale 1."""
    settings = InferenceSettings(
        score_threshold=0.1, nms_iou=0.5, detections=25, mask_threshold=0.5, cache=ALL
    )
    expected, _ = direct_ap50(model, dataset, settings)
    assert 0 < expected < 1
    ensemble = build_cache([model, other], dataset, cache=ALL, scales=(1.0,), flips=(), progress=False)
    assert ensemble.ap50(settings) == pytest.approx(expected, abs=1e-3)
    assert ensemble.ap50(dataclasses.replace(settings, models=2)) != pytest.approx(expected, abs=1e-3)
    twice = build_cache([model, model], dataset, cache=ALL, scales=(1.0,), flips=(), progress=False)
    assert twice.ap50(dataclasses.replace(settings, models=2)) == pytest.approx(expected, abs=1e-3)
    assert parse_scales(scales_label((1.0,))) == settings.scales


def test_a_scale_given_twice_is_refused_by_the_space_and_predicted_once_by_the_cache(model, dataset):
    with pytest.raises(ConfigError, match="--scales 1.0 1: a scale is given twice"):
        SettingsSpace(cache=ALL, scales=(1.0, 1))
    built = build_cache([model], dataset, cache=ALL, scales=(1.0, 1), flips=(), progress=False)
    assert list(built.passes) == [(0, 1.0, "none")] and len(built.passes[(0, 1.0, "none")]) == len(dataset)


def test_a_cache_stays_within_its_bound(model, dataset):
    built = build_cache([model], dataset, cache=ALL, scales=(1.0,), flips=("hflip",), progress=False)
    assert 0 < built.nbytes <= cache_bound_bytes(2, len(dataset), ALL.detections, 28)
    assert all(d.masks.dtype == torch.float16 for passes in built.passes.values() for d in passes)


def detections(boxes, labels, scores) -> Detections:
    n = len(boxes)
    return Detections(
        torch.tensor(boxes, dtype=torch.float32),
        torch.tensor(labels),
        torch.tensor(scores),
        torch.rand(n, 28, 28),
        (100, 100),
    )


def test_score_threshold_nms_kinds_and_the_detection_cap():
    found = detections(
        [[0, 0, 20, 20], [1, 0, 21, 20], [50, 50, 60, 60], [70, 70, 80, 80]],
        [1, 2, 1, 3],
        [0.9, 0.8, 0.3, 0.2],
    )
    settings = InferenceSettings(score_threshold=0.2, nms_iou=0.5, detections=10, cache=ALL)
    assert apply_settings([found], settings).scores.tolist() == pytest.approx(
        [0.9, 0.8, 0.3]
    )  # 0.2 is not above
    agnostic = apply_settings([found], dataclasses.replace(settings, class_agnostic=True))
    assert agnostic.scores.tolist() == pytest.approx([0.9, 0.3])  # the class-2 near-duplicate goes
    assert apply_settings([found], dataclasses.replace(settings, detections=1)).labels.tolist() == [1]


def test_settings_file_round_trip_and_a_bad_file(tmp_path):
    settings = InferenceSettings(
        scales=(1.0, 1.25), flips=("hflip",), models=2, merge_iou=0.6, class_agnostic=True, cache=ALL
    )
    path = write_settings(tmp_path / "inference.json", settings, {"tuned_run": "abc"})
    assert read_settings(path) == settings
    assert json.loads(path.read_text())["tuned_run"] == "abc"
    assert read_members(path) == ["abc"]  # a file without members names its tuned run
    path.write_text('{"settings": {"scale": 1}}')
    with pytest.raises(DataError, match="--no-tuned-settings"):
        read_settings(path)


def test_a_settings_file_from_before_merged_scales_and_ensembles_loads(tmp_path):
    """A file written before ``scales`` and ``models`` existed: its one ``scale``, one model."""
    old = {
        "settings": {
            "scale": 1.25,
            "flips": "hflip",
            "merge_iou": 0.6,
            "score_threshold": 0.0,
            "nms_iou": 0.5,
            "class_agnostic": False,
            "detections": 500,
            "mask_threshold": 0.5,
            "cache_score_threshold": 0.0,
            "cache_nms_iou": 0.7,
            "cache_detections": 1000,
        },
        "tuned_run": "abc",
    }
    path = tmp_path / "inference.json"
    path.write_text(json.dumps(old))
    assert read_settings(path) == InferenceSettings(scales=(1.25,), flips=("hflip",), merge_iou=0.6)
    assert read_members(path) == ["abc"]


def test_the_space_asks_for_every_setting_and_checks_its_ranges():
    space = SettingsSpace(
        cache=CacheSettings(nms_iou=0.6, detections=200), scales=(1.0, 1.5), flips=("hflip",)
    )
    chosen = dict(
        scales="1.5",
        tta=True,
        merge_iou=0.4,
        score_threshold=0.1,
        nms_iou=0.3,
        class_agnostic=False,
        detections=80,
        mask_threshold=0.45,
    )
    settings = suggest_settings(optuna.trial.FixedTrial(chosen), space)
    assert settings == InferenceSettings(
        scales=(1.5,),
        flips=("hflip",),
        merge_iou=0.4,
        score_threshold=0.1,
        nms_iou=0.3,
        detections=80,
        mask_threshold=0.45,
        cache=space.cache,
    )
    grid = grid_values(space)
    assert grid["nms_iou"] == [0.2, 0.4, 0.6] and grid["detections"] == [50, 100, 200]
    assert scale_sets((1.0, 1.25, 1.5)) == ["1", "1.25", "1.5", "1+1.25", "1+1.5", "1.25+1.5", "1+1.25+1.5"]
    ensemble = dataclasses.replace(space, models=3)
    merged = suggest_settings(
        optuna.trial.FixedTrial({**chosen, "scales": "1+1.5", "models": 2, "tta": False, "merge_iou": 0.7}),
        ensemble,
    )
    assert (merged.scales, merged.models, merged.flips, merged.merge_iou) == ((1.0, 1.5), 2, (), 0.7)
    assert merged.passes == 4 and grid_values(ensemble)["models"] == [1, 2, 3]
    with pytest.raises(ConfigError, match="including 1"):
        SettingsSpace(cache=ALL, scales=(1.25,))
    with pytest.raises(ConfigError, match="--cache-detections 10"):
        SettingsSpace(cache=CacheSettings(detections=10))


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_the_study_finds_the_best_settings_of_a_known_score(sampler):
    space = SettingsSpace(cache=CacheSettings(nms_iou=0.7, detections=100))

    def score(settings: InferenceSettings) -> float:  # best at class-agnostic NMS 0.45, 100 detections
        return settings.class_agnostic - abs(settings.nms_iou - 0.45) + settings.detections / 1000

    study = settings_study(space, score, sampler=sampler, trials=60, seed=0, progress=False)
    best = suggest_settings(optuna.trial.FixedTrial(study.best_params), space)
    assert best.class_agnostic and abs(best.nms_iou - 0.45) < 0.1
    assert len(study.trials) == 60
