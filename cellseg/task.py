"""What the task fixes: the cell classes and the metrics evaluation reports (higher is better).

A leaf module (imports nothing of ours) so that config, data, model and evaluation can share it.
"""

from __future__ import annotations

NUM_CLASSES = 4  # class1.tif ... class4.tif in every training folder (DATA.md)
IOU_TYPES = ("segm", "bbox")  # COCOeval's mask and box evaluations
SUMMARIES = ("AP", "AP50", "AP75", "AR")  # per IoU type, over all areas and max_dets detections


def metric_names(num_classes: int = NUM_CLASSES) -> tuple[str, ...]:
    """Every key ``evaluation.evaluate_results`` returns: summaries, then per-class segm AP50."""
    return (
        *(f"{iou}_{s}" for iou in IOU_TYPES for s in SUMMARIES),
        *(f"segm_AP50_class{k}" for k in range(1, num_classes + 1)),
    )


METRICS = metric_names()  # the names train.metric may take
