"""Memory-safe inference matches torchvision's own output on a tiny random Mask R-CNN."""

import copy

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection import MaskRCNN

from cellseg.predict import predict_images


@pytest.fixture(scope="module")
def model(tiny_maskrcnn) -> MaskRCNN:
    return tiny_maskrcnn(detections=40, rpn_pre_nms=200, rpn_post_nms=100)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "size, device", [((33, 35), "cpu"), ((300, 1200), "cpu"), pytest.param((300, 1200), "cuda", marks=CUDA)]
)
def test_matches_torchvision_output(model, size, device):
    model = copy.deepcopy(model).to(device)
    torch.manual_seed(1)
    image = torch.rand(3, *size, device=device)
    with torch.inference_mode():
        [expected] = model([image])
    [prediction] = predict_images(model, [image])
    assert len(prediction.scores) > 0
    expected = {key: value.cpu().numpy() for key, value in expected.items()}
    np.testing.assert_allclose(prediction.boxes, expected["boxes"], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(prediction.labels, expected["labels"])
    np.testing.assert_allclose(prediction.scores, expected["scores"], rtol=1e-5)
    masks = np.stack([mask_utils.decode(rle) for rle in prediction.rles])
    expected_masks = expected["masks"][:, 0] > 0.5
    assert masks.shape == expected_masks.shape
    assert (masks != expected_masks).sum() <= 5 * len(masks)


def test_score_threshold_and_batches(model):
    torch.manual_seed(2)
    images = [torch.rand(3, 40, 60), torch.rand(3, 70, 50)]
    all_predictions = predict_images(model, images)
    threshold = float(np.median(all_predictions[0].scores))
    kept = predict_images(model, images, score_threshold=threshold)
    for full, part, image in zip(all_predictions, kept, images):
        assert (part.scores >= threshold).all()
        assert len(part.rles) == len(part.scores) == len(part.boxes)
        assert part.rles == [r for r, s in zip(full.rles, full.scores) if s >= threshold]
        assert all(r["size"] == list(image.shape[1:]) for r in part.rles)


def test_requires_eval_mode(model):
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            predict_images(model, [torch.rand(3, 32, 32)])
    finally:
        model.eval()
