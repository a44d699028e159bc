"""train_one_epoch and evaluate on a tiny model and a synthetic two-image batch (seconds)."""

from __future__ import annotations

import pytest
import torch

from cellseg.config import ModelConfig, OptimConfig
from cellseg.engine import NonFiniteLossError, evaluate, train_one_epoch
from cellseg.model import build_model
from cellseg.optim import LRSchedule, build_optimizer
from cellseg.task import metric_names

LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def batch(image_id: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two 64x64 images, each with one square cell of class 1 and one of class 3."""
    images, targets = [], []
    for k in range(2):
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        masks[0, 8:28, 10:30] = 1
        masks[1, 36:60, 30 + k : 54 + k] = 1
        images.append(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(k)))
        targets.append(
            {
                "boxes": torch.tensor([[10.0, 8.0, 30.0, 28.0], [30.0 + k, 36.0, 54.0 + k, 60.0]]),
                "labels": torch.tensor([1, 3]),
                "masks": masks,
                "image_id": torch.tensor(image_id + k),
            }
        )
    return images, targets


def setup(model_cfg: ModelConfig, lr: float = 1e-3, warmup_epochs: float = 1.0, iters: int = 2):
    torch.manual_seed(0)
    model = build_model(model_cfg)
    cfg = OptimConfig(name="sgd", lr=lr, warmup_epochs=warmup_epochs, weight_decay=0.0)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    return model, optimizer, LRSchedule(optimizer, cfg, epochs=2, iters_per_epoch=iters)


def test_train_one_epoch_means_losses_and_steps_the_schedule(tiny_model) -> None:
    model, optimizer, schedule = setup(tiny_model())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first_lr = schedule.lr
    losses = train_one_epoch(
        model, optimizer, schedule, [batch(0), batch(2)], torch.device("cpu"), epoch=1, progress=False
    )
    assert set(losses) == LOSSES | {"loss"}
    assert losses["loss"] == pytest.approx(sum(losses[k] for k in LOSSES))
    assert all(v > 0 for v in losses.values())
    assert schedule.iteration == 2 and schedule.lr > first_lr  # warmup advanced per step
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("roi_heads.") for k in changed)
    assert model.training


def test_train_one_epoch_on_no_batches_returns_nothing(tiny_model) -> None:
    model, optimizer, schedule = setup(tiny_model())
    assert train_one_epoch(model, optimizer, schedule, [], torch.device("cpu"), epoch=1, progress=False) == {}


def test_a_non_finite_loss_names_every_term(tiny_model) -> None:
    # SGD at lr 1e6: the first update blows the weights up, the second forward pass gives NaN
    model, optimizer, schedule = setup(tiny_model(), lr=1e6, warmup_epochs=0.0)
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 2: .*loss_classifier"):
        train_one_epoch(
            model, optimizer, schedule, [batch(0), batch(2)], torch.device("cpu"), epoch=3, progress=False
        )


def test_gradient_clipping_bounds_the_update(tiny_model) -> None:
    steps = []
    for clip in (0.0, 1e-6):
        model, optimizer, schedule = setup(tiny_model(), lr=0.5, warmup_epochs=0.0)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        train_one_epoch(
            model,
            optimizer,
            schedule,
            [batch(0)],
            torch.device("cpu"),
            epoch=1,
            grad_clip=clip,
            progress=False,
        )
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        steps.append(sum(float((a - b).norm() ** 2) for a, b in zip(after, before)) ** 0.5)
    assert steps[1] < 1e-5 < steps[0]  # lr 0.5 x total gradient norm 1e-6 (momentum: first step)


def test_evaluate_reports_every_metric_and_val_loss_without_touching_norm_statistics(tiny_model) -> None:
    model, _, _ = setup(tiny_model())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    metrics = evaluate(
        model, [batch(0), batch(2)], torch.device("cpu"), max_dets=100, progress=False, with_loss=True
    )
    assert set(metrics) == set(metric_names()) | {"val_loss"}
    assert metrics["val_loss"] > 0
    assert all(-1.0 <= v <= 1.0 for k, v in metrics.items() if k != "val_loss")
    assert metrics["segm_AP50_class2"] == -1.0  # no class-2 instance in the batches
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert not model.training
    assert "val_loss" not in evaluate(model, [batch(0)], torch.device("cpu"), max_dets=100, progress=False)
