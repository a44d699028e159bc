"""The best epoch's validation predictions, kept in ``best.pt`` beside the weights.

``fit`` already predicts every validation image when it scores an epoch; storing those
predictions with the best epoch's model lets the run's pictures and the bootstrap interval of its
AP50 use them instead of running the same model over the same images again. They are valid only
for the images they were made on: a reader passes the names of the validation split it sees now
and gets None when they differ (another data root, another split), and then predicts itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cellseg.evaluation import ImagePrediction

KEY = "validation_predictions"  # the key in a checkpoint's state


def prediction_state(predictions: Mapping[int, ImagePrediction], names: Sequence[str]) -> dict[str, Any]:
    """``predictions`` keyed by image id (the split's index), made on the images ``names`` (in
    image id order), as plain types and tensors (a checkpoint loads with ``weights_only``)."""
    return {
        "names": list(names),
        "images": [
            {
                "image_id": int(image_id),
                "boxes": torch.from_numpy(p.boxes),
                "labels": torch.from_numpy(p.labels),
                "scores": torch.from_numpy(p.scores),
                "rles": [{"size": [int(s) for s in r["size"]], "counts": r["counts"]} for r in p.rles],
            }
            for image_id, p in sorted(predictions.items())
        ],
    }


def stored_predictions(state: Mapping[str, Any], names: Sequence[str]) -> dict[int, ImagePrediction] | None:
    """The predictions a checkpoint ``state`` holds, keyed by image id, when they were made on the
    images ``names``; None when it holds none or they were made on other images."""
    stored = state.get(KEY)
    if not stored or list(stored["names"]) != list(names):
        return None
    return {
        image["image_id"]: ImagePrediction(
            boxes=image["boxes"].numpy(),
            labels=image["labels"].numpy(),
            scores=image["scores"].numpy(),
            rles=[dict(r) for r in image["rles"]],
        )
        for image in stored["images"]
    }
