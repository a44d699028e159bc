"""The best epoch's validation predictions, kept in ``best.pt`` beside the weights.

``fit`` already predicts every validation image when it scores an epoch; storing those
predictions with the best epoch's model lets the run's pictures and the bootstrap interval of its
AP50 use them instead of running the same model over the same images again. They count only for
the data they were made on: the validation images' names and the dataset's fingerprint (its files'
names and sizes and its split, wherever its root lies; cellseg.data.fingerprint) must be those a
reader sees now, else the reader gets None and predicts itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cellseg.evaluation import ImagePrediction

KEY = "validation_predictions"  # the key in a checkpoint's state


def prediction_state(
    predictions: Mapping[int, ImagePrediction], names: Sequence[str], data_digest: str
) -> dict[str, Any]:
    """``{KEY: ...}`` for a checkpoint's state: ``predictions`` of the validation images ``names``
    keyed by image id (image id i is ``names[i]``) on the data ``data_digest`` fingerprints, as
    plain types and tensors (a checkpoint loads with ``weights_only``)."""
    if sorted(predictions) != list(range(len(names))):
        raise ValueError(f"predictions of image ids {sorted(predictions)} for {len(names)} images")
    return {
        KEY: {
            "data": data_digest,
            "names": list(names),
            "images": [
                {
                    "boxes": torch.from_numpy(p.boxes),
                    "labels": torch.from_numpy(p.labels),
                    "scores": torch.from_numpy(p.scores),
                    "rles": [{"size": [int(s) for s in r["size"]], "counts": r["counts"]} for r in p.rles],
                }
                for _, p in sorted(predictions.items())
            ],
        }
    }


def stored_predictions(
    state: Mapping[str, Any], names: Sequence[str], data_digest: str
) -> dict[int, ImagePrediction] | None:
    """The predictions a checkpoint ``state`` holds, keyed by image id, when they were made on the
    validation images ``names`` of the data ``data_digest`` fingerprints; else None."""
    stored = state.get(KEY)
    if not stored or stored.get("data") != data_digest or list(stored["names"]) != list(names):
        return None
    return {
        image_id: ImagePrediction(
            boxes=image["boxes"].numpy(),
            labels=image["labels"].numpy(),
            scores=image["scores"].numpy(),
            rles=[dict(r) for r in image["rles"]],
        )
        for image_id, image in enumerate(stored["images"])
    }
