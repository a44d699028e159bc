"""Test-time flips and the merge of passes (cellseg.tta) on hand-made detections, an exactly
flip-equivariant detector and a tiny random Mask R-CNN."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from scipy import ndimage
from torchvision.models.detection import MaskRCNN

from cellseg.predict import Detections, encode_detections, predict_images
from cellseg.tta import augmented_passes, merge_detections, model_detector, predict_merged, unflip

M = 28
SIZE = (60, 80)


def detections(boxes, labels, scores, masks=None, size=SIZE) -> Detections:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.ones(len(boxes), M, M) if masks is None else torch.as_tensor(masks, dtype=torch.float32)
    return Detections(boxes, torch.tensor(labels, dtype=torch.int64), torch.tensor(scores), masks, size)


# ----------------------------------------------------------------------------- merge rule


def test_matched_detections_are_averaged():
    first = detections([[10, 10, 30, 30]], [1], [0.9], torch.full((1, M, M), 0.8))
    second = detections([[12, 10, 32, 30]], [1], [0.5], torch.full((1, M, M), 0.4))  # IoU 0.82
    merged = merge_detections([first, second], iou_threshold=0.5)
    assert merged.scores.tolist() == pytest.approx([0.7])
    assert merged.boxes.tolist() == [pytest.approx([11, 10, 31, 30])]
    assert merged.labels.tolist() == [1]
    inner = merged.masks[0, :, 2:-2]  # away from the columns that leave one of the two boxes
    assert torch.allclose(inner, torch.tensor(0.6))


def test_unmatched_detections_count_zero_in_the_scores_of_the_passes_that_missed_them():
    """Scores are divided by every pass, masks averaged over the passes that found the instance:
    a detection one pass in three found keeps its mask (divided by 3 it would vanish at 0.5)."""
    first = detections([[10, 10, 30, 30], [40, 40, 50, 50]], [1, 2], [0.9, 0.6])
    second = detections([[10, 10, 30, 30], [40, 40, 50, 50]], [1, 3], [0.3, 0.9])  # class differs
    third = detections([[50, 0, 60, 8]], [1], [0.3])
    merged = merge_detections([first, second, third], iou_threshold=0.5)
    got = sorted(zip(merged.scores.tolist(), merged.labels.tolist(), merged.boxes.tolist()))
    assert [(round(s, 6), label) for s, label, _ in got] == [
        (0.1, 1),
        (0.2, 2),
        (0.3, 3),
        (0.4, 1),
    ]  # 0.3/3, 0.6/3, 0.9/3, (0.9 + 0.3)/3
    assert torch.allclose(merged.masks, torch.tensor(1.0))  # every member's mask is all ones


def test_iou_threshold_decides_matching():
    first = detections([[0, 0, 20, 20]], [1], [0.8])
    second = detections([[10, 0, 30, 20]], [1], [0.8])  # IoU 1/3
    assert len(merge_detections([first, second], iou_threshold=0.3).scores) == 1
    assert len(merge_detections([first, second], iou_threshold=0.34).scores) == 2


def test_each_pass_gives_a_group_one_member_at_most_the_best_overlap():
    seed = detections([[0, 0, 20, 20]], [1], [0.9])
    other = detections([[1, 0, 21, 20], [0, 0, 20, 20]], [1, 1], [0.5, 0.4])
    merged = merge_detections([seed, other], iou_threshold=0.5)
    got = sorted(zip(merged.scores.tolist(), merged.boxes.tolist()))
    assert got[1][0] == pytest.approx((0.9 + 0.4) / 2)  # matched the identical box, not the higher score
    assert got[1][1] == pytest.approx([0, 0, 20, 20])
    assert got[0][0] == pytest.approx(0.25) and got[0][1] == pytest.approx([1, 0, 21, 20])


def test_masks_are_resampled_onto_the_merged_box():
    left = detections([[0, 0, 28, 28]], [1], [1.0], size=(28, 42))
    right = detections([[14, 0, 42, 28]], [1], [1.0], size=(28, 42))
    merged = merge_detections([left, right], iou_threshold=0.3)
    assert merged.boxes.tolist() == [[7, 0, 35, 28]]
    columns = merged.masks[0].mean(dim=0)  # merged pixel u is image column 7 + u
    expected = torch.tensor([0.5] * 7 + [1.0] * 14 + [0.5] * 7)
    assert torch.allclose(columns, expected, atol=1e-5)


def test_max_detections_keeps_the_best_and_empty_passes_merge_to_nothing():
    many = detections([[i * 5, 0, i * 5 + 4, 4] for i in range(6)], [1] * 6, [0.1, 0.6, 0.3, 0.9, 0.2, 0.5])
    merged = merge_detections([many], max_detections=3)
    assert merged.scores.tolist() == pytest.approx([0.9, 0.6, 0.5])
    empty = detections([], [], [])
    none = merge_detections([empty, empty])
    assert none.boxes.shape == (0, 4) and none.masks.shape == (0, M, M)
    assert encode_detections(none).rles == []
    with pytest.raises(ValueError, match="at least one pass"):
        merge_detections([])


def test_unflip_maps_boxes_and_masks_and_is_its_own_inverse():
    mask = torch.zeros(1, M, M)
    mask[0, 0, :5] = 1.0  # top-left corner of the box
    one = detections([[10, 5, 30, 25]], [1], [0.5], mask)
    flipped = unflip(one, "hflip")
    assert flipped.boxes.tolist() == [[50, 5, 70, 25]]  # width 80
    assert flipped.masks[0, 0, -5:].eq(1).all() and flipped.masks[0, 0, :-5].eq(0).all()
    both = unflip(one, "hvflip")
    assert both.boxes.tolist() == [[50, 35, 70, 55]]  # height 60
    assert both.masks[0, -1, -5:].eq(1).all()
    again = unflip(unflip(one, "vflip"), "vflip")
    assert torch.equal(again.boxes, one.boxes) and torch.equal(again.masks, one.masks)
    with pytest.raises(ValueError, match="'rot90'.*hflip"):
        augmented_passes(lambda image: one, torch.zeros(3, *SIZE), ["rot90"])


# ----------------------------------------------------------------------------- flip-equivariant detector


def component_detector(image: torch.Tensor) -> Detections:
    """Bright blobs of channel 0 as detections: box, mean channel-1 intensity as score, the blob's
    box crop average-pooled to M x M as mask, class 1 or 2 by score, highest score first. Exactly
    flip-equivariant by construction."""
    blobs, _ = ndimage.label(image[0].numpy() > 0.5)
    boxes, scores, masks = [], [], []
    for index, (rows, cols) in enumerate(ndimage.find_objects(blobs), start=1):
        inside = torch.from_numpy(blobs[rows, cols] == index).float()
        boxes.append([cols.start, rows.start, cols.stop, rows.stop])
        scores.append(float(image[1][rows, cols][inside.bool()].mean()))
        masks.append(F.adaptive_avg_pool2d(inside[None], (M, M))[0])
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return detections(
        [boxes[i] for i in order],
        [1 if scores[i] > 0.5 else 2 for i in order],
        [scores[i] for i in order],
        torch.stack([masks[i] for i in order]),
        tuple(image.shape[1:]),
    )


def blob_image() -> torch.Tensor:
    image = torch.zeros(3, 90, 70)
    yy, xx = torch.meshgrid(torch.arange(90.0), torch.arange(70.0), indexing="ij")
    for cy, cx, ry, rx, score in ((20, 15, 9, 6, 0.9), (60, 45, 14, 10, 0.4), (30, 50, 5, 12, 0.7)):
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        blob |= (yy >= cy) & (yy <= cy + ry) & (xx >= cx) & (xx <= cx + rx) & (xx - cx >= yy - cy)
        image[0][blob], image[1][blob] = 1.0, score  # an ellipse and a triangle: no mirror symmetry
    return image


def test_tta_of_a_flip_equivariant_detector_equals_no_tta():
    image = blob_image()
    plain = encode_detections(component_detector(image))
    assert len(plain.scores) == 3
    for flips in (["hflip"], ["vflip"], ["hflip", "vflip", "hvflip"]):
        passes = augmented_passes(component_detector, image, flips)
        for view in passes[1:]:  # each view, mapped back, is the plain pass
            assert torch.equal(view.boxes, passes[0].boxes)
            assert torch.allclose(view.masks, passes[0].masks, atol=1e-6)
        merged = predict_merged([component_detector], image, flips=flips, iou_threshold=0.5)
        np.testing.assert_allclose(merged.scores, plain.scores, rtol=1e-6)
        np.testing.assert_array_equal(merged.boxes, plain.boxes)
        np.testing.assert_array_equal(merged.labels, plain.labels)
        assert merged.rles == plain.rles


# ----------------------------------------------------------------------------- a real Mask R-CNN


@pytest.fixture(scope="module")
def model(tiny_maskrcnn) -> MaskRCNN:
    return tiny_maskrcnn(detections=20)


def decoded(rles: list[dict]) -> np.ndarray:
    return np.stack([mask_utils.decode(rle) for rle in rles]) if rles else np.zeros((0,))


def test_ensemble_of_one_model_equals_that_model(model):
    torch.manual_seed(3)
    image = torch.rand(3, 50, 70)
    [plain] = predict_images(model, [image])
    assert len(plain.scores) > 0
    for detectors in ([model_detector(model)], [model_detector(model)] * 2):  # one, or it twice
        merged = predict_merged(detectors, image, iou_threshold=0.5)
        np.testing.assert_allclose(merged.scores, plain.scores, rtol=1e-6)
        np.testing.assert_allclose(merged.boxes, plain.boxes, atol=1e-4)
        np.testing.assert_array_equal(merged.labels, plain.labels)
        assert merged.rles == plain.rles


def test_tta_on_a_real_model_stays_in_bounds(model):
    torch.manual_seed(4)
    image = torch.rand(3, 45, 66)
    merged = predict_merged(
        [model_detector(model)],
        image,
        flips=["hflip", "vflip"],
        iou_threshold=0.5,
        max_detections=20,
        score_threshold=0.01,
    )
    assert 0 < len(merged.scores) <= 20
    assert (merged.scores >= 0.01).all() and (np.diff(merged.scores) <= 0).all()
    assert all(rle["size"] == [45, 66] for rle in merged.rles)
    assert (merged.boxes >= 0).all() and (merged.boxes[:, 2] <= 66).all() and (merged.boxes[:, 3] <= 45).all()
    assert decoded(merged.rles).any()
