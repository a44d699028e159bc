"""Optimizer choice and the closed-form learning-rate schedule (warmup x epoch factor)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cellseg.config import OptimConfig
from cellseg.errors import ConfigError
from cellseg.optim import OPTIMIZERS, LRSchedule, build_optimizer, load_optimizer_state, optimizer_settings


def make(cfg: OptimConfig, *, epochs: int = 10, iters: int = 4) -> tuple[torch.optim.Optimizer, LRSchedule]:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    optimizer = build_optimizer(params, cfg)
    return optimizer, LRSchedule(optimizer, cfg, epochs=epochs, iters_per_epoch=iters)


def run_epochs(schedule: LRSchedule, epochs: int, iters: int, metrics=None) -> list[float]:
    """The lr of every iteration, stepping the epoch at the end of each (as fit does)."""
    lrs = []
    for e in range(epochs):
        for _ in range(iters):
            lrs.append(schedule.lr)
            schedule.step_iteration()
        schedule.step_epoch(metrics[e] if metrics is not None else 0.0)
    return lrs


def test_warmup_ramps_linearly_then_reaches_lr() -> None:
    cfg = OptimConfig(lr=0.1, scheduler="none", warmup_epochs=2.0)
    _, schedule = make(cfg, iters=4)  # 8 warmup iterations
    lrs = []
    for _ in range(12):
        lrs.append(schedule.lr)
        schedule.step_iteration()
    expected = [0.1 * (i + 1) / 8 for i in range(8)] + [0.1] * 4
    assert lrs == pytest.approx(expected)
    steps = [b - a for a, b in zip(lrs, lrs[1:8])]
    assert steps == pytest.approx([0.1 / 8] * 7)  # linear
    assert lrs[0] > 0


def test_no_warmup_starts_at_lr() -> None:
    _, schedule = make(OptimConfig(lr=0.02, scheduler="none", warmup_epochs=0.0))
    assert schedule.lr == pytest.approx(0.02)
    assert run_epochs(schedule, 3, 4) == pytest.approx([0.02] * 12)


def test_all_param_groups_follow_the_schedule() -> None:
    cfg = OptimConfig(lr=0.1, scheduler="none", warmup_epochs=1.0)
    optimizer, schedule = make(cfg, iters=10)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    schedule.step_iteration()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.02])


def test_cosine_ends_near_zero_at_last_epoch() -> None:
    epochs = 6
    cfg = OptimConfig(lr=0.01, scheduler="cosine", warmup_epochs=0.0)
    _, schedule = make(cfg, epochs=epochs, iters=3)
    per_epoch = []
    for _ in range(epochs):
        per_epoch.append(schedule.lr)
        for _ in range(3):
            schedule.step_iteration()
        schedule.step_epoch(0.0)
    assert per_epoch[0] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(per_epoch, per_epoch[1:]))  # decreasing
    for e, lr in enumerate(per_epoch):
        assert lr == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * e / epochs)))
    # the last trained epoch runs at a small lr, and after it the lr is zero
    assert per_epoch[-1] < 0.1 * 0.01
    assert schedule.lr == pytest.approx(0.0, abs=1e-12)
    schedule.step_epoch(0.0)  # past the end stays at zero, never climbs back
    assert schedule.lr == pytest.approx(0.0, abs=1e-12)


def test_step_decays_by_gamma_every_step_size() -> None:
    cfg = OptimConfig(lr=1.0, scheduler="step", step_size=3, gamma=0.5, warmup_epochs=0.0)
    _, schedule = make(cfg, epochs=10, iters=2)
    per_epoch = []
    for _ in range(10):
        per_epoch.append(schedule.lr)
        schedule.step_iteration()
        schedule.step_iteration()
        schedule.step_epoch(0.0)
    assert per_epoch == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125])


def test_plateau_halves_after_patience_epochs_without_improvement() -> None:
    cfg = OptimConfig(lr=0.1, scheduler="plateau", plateau_patience=2, plateau_factor=0.5, warmup_epochs=0.0)
    _, schedule = make(cfg, epochs=20, iters=1)
    lrs = []
    # improves for 3 epochs, then flat: patience 2 tolerates 2 bad epochs, the 3rd decays
    for metric in [0.1, 0.2, 0.3, 0.3, 0.25, 0.3]:
        schedule.step_epoch(metric)
        lrs.append(schedule.lr)
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, 0.05])
    # the counter restarts after a decay: another 3 bad epochs before the next halving
    for metric in [0.1, 0.1]:
        schedule.step_epoch(metric)
        assert schedule.lr == pytest.approx(0.05)
    schedule.step_epoch(0.1)
    assert schedule.lr == pytest.approx(0.025)
    # an improvement resets the bad-epoch counter
    schedule.step_epoch(0.9)
    schedule.step_epoch(0.5)
    schedule.step_epoch(0.5)
    assert schedule.lr == pytest.approx(0.025)


def test_plateau_combines_with_warmup() -> None:
    cfg = OptimConfig(lr=0.1, scheduler="plateau", plateau_patience=0, plateau_factor=0.5, warmup_epochs=1.0)
    _, schedule = make(cfg, epochs=5, iters=4)
    schedule.step_epoch(0.5)  # improvement at iteration 0: factor stays 1
    schedule.step_epoch(0.5)  # no improvement, patience 0: factor halves
    assert schedule.lr == pytest.approx(0.1 * 0.5 * 1 / 4)


@pytest.mark.parametrize("split", [1, 3])  # 1: resumed inside the warmup
@pytest.mark.parametrize("scheduler", ["cosine", "step", "plateau", "none"])
def test_state_dict_resumes_to_identical_lr_sequence(scheduler: str, split: int) -> None:
    cfg = OptimConfig(
        lr=0.05,
        scheduler=scheduler,
        warmup_epochs=1.5,
        step_size=2,
        gamma=0.3,
        plateau_patience=1,
        plateau_factor=0.5,
    )
    metrics = [0.1, 0.2, 0.2, 0.2, 0.1, 0.3, 0.3, 0.3]
    iters = 4
    _, full = make(cfg, epochs=8, iters=iters)
    reference = run_epochs(full, 8, iters, metrics)

    _, first = make(cfg, epochs=8, iters=iters)
    head = run_epochs(first, split, iters, metrics[:split])
    state = first.state_dict()
    assert set(state) == {"iteration", "epoch", "factor", "best", "bad_epochs"}

    _, resumed = make(cfg, epochs=8, iters=iters)  # a fresh schedule starts in warmup
    assert resumed.lr != pytest.approx(first.lr)
    resumed.load_state_dict(state)
    assert resumed.lr == first.lr  # load applies the restored lr to the optimizer at once
    tail = run_epochs(resumed, 8 - split, iters, metrics[split:])
    assert head + tail == reference  # exact, not approximate


def test_state_dict_survives_torch_save_weights_only(tmp_path) -> None:
    cfg = OptimConfig(lr=0.05, scheduler="plateau", warmup_epochs=0.0)
    _, schedule = make(cfg)
    schedule.step_epoch(0.4)  # best becomes a float, not -inf
    torch.save(schedule.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == schedule.state_dict()
    _, fresh = make(cfg)
    torch.save(fresh.state_dict(), tmp_path / "f.pt")  # best = -inf is also loadable
    assert torch.load(tmp_path / "f.pt", weights_only=True)["best"] == -math.inf


@pytest.mark.parametrize(
    "name, cls",
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
def test_build_optimizer_class_and_momentum(name: str, cls: type) -> None:
    cfg = OptimConfig(name=name, lr=0.01, momentum=0.77, weight_decay=0.003)
    params = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = build_optimizer(params, cfg)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.003
    assert group["params"] == params
    if name == "sgd":
        assert group["momentum"] == 0.77
    else:
        assert "momentum" not in group
        assert group["betas"] == (0.9, 0.999)
    assert group["fused"] is True


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizer_follows_torchs_default_implementation(name: str) -> None:
    # the fused step is only faster: the same path as torch's default for-loop, to float rounding
    cfg = OptimConfig(name=name, lr=0.01, momentum=0.9, weight_decay=0.01)
    torch.manual_seed(0)
    start = torch.randn(3, 5)
    fused = torch.nn.Parameter(start.clone())
    default = torch.nn.Parameter(start.clone())
    optimizers = build_optimizer([fused], cfg), OPTIMIZERS[name]([default], **optimizer_settings(cfg))
    for _ in range(5):
        grad = torch.randn(3, 5)
        for param, optimizer in zip((fused, default), optimizers, strict=True):
            param.grad = grad.clone()
            optimizer.step()
    assert not torch.equal(fused.detach(), start)
    torch.testing.assert_close(fused.detach(), default.detach())


def test_build_optimizer_rejects_unknown_name() -> None:
    # OptimConfig is typed but not checked on construction; the builder names the allowed values
    cfg = dataclasses.replace(OptimConfig(), name="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sgd.*adam.*adamw"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)


def test_optimizer_steps_with_scheduled_lr() -> None:
    cfg = OptimConfig(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0, scheduler="none", warmup_epochs=1.0)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], cfg)
    schedule = LRSchedule(optimizer, cfg, epochs=1, iters_per_epoch=2)
    param.grad = torch.ones(1)
    optimizer.step()  # lr = 0.5 * 1/2
    assert float(param.detach()) == pytest.approx(-0.25)
    schedule.step_iteration()
    optimizer.step()  # lr = 0.5
    assert float(param.detach()) == pytest.approx(-0.75)


@pytest.mark.parametrize("scheduler", ["cosine", "step"])
def test_resume_with_more_epochs_follows_the_longer_schedule(scheduler: str) -> None:
    """A finished 1-epoch cosine run stores factor 0; extended to 2 epochs it must go on training
    exactly as a 2-epoch run would, not at lr 0."""
    cfg = OptimConfig(lr=0.1, scheduler=scheduler, warmup_epochs=0.5, step_size=1, gamma=0.5)
    _, short = make(cfg, epochs=1, iters=4)
    run_epochs(short, 1, 4)
    if scheduler == "cosine":
        assert short.lr == pytest.approx(0.0, abs=1e-12)
    _, longer = make(cfg, epochs=2, iters=4)
    longer.load_state_dict(short.state_dict())
    _, straight = make(cfg, epochs=2, iters=4)
    reference = run_epochs(straight, 2, 4)
    assert run_epochs(longer, 1, 4) == reference[4:]


def test_plateau_holds_its_rate_without_validation() -> None:
    """A run without validation (data.val_fraction 0) has no metric: plateau never decays."""
    cfg = OptimConfig(lr=0.1, scheduler="plateau", plateau_patience=1, plateau_factor=0.5, warmup_epochs=0.0)
    _, schedule = make(cfg, epochs=10, iters=1)
    for _ in range(6):
        schedule.step_epoch(None)
    assert schedule.lr == pytest.approx(0.1)


def test_a_checkpoint_from_before_fused_optimizers_resumes_fused() -> None:
    cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.01)
    param = torch.nn.Parameter(torch.ones(4))
    earlier = OPTIMIZERS["adamw"]([param], **optimizer_settings(cfg))  # as cellseg built it before
    param.grad = torch.ones(4)
    earlier.step()
    resumed = torch.nn.Parameter(param.detach().clone())
    optimizer = build_optimizer([resumed], cfg)
    load_optimizer_state(optimizer, earlier.state_dict())
    assert optimizer.param_groups[0]["fused"] is True
    scaler = torch.amp.GradScaler("cpu")  # what a GPU in float16 trains with: fails unfused
    scaler.scale((resumed * 2).sum()).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    assert float(optimizer.state[resumed]["step"]) == 2.0
    assert not torch.equal(resumed.detach(), param.detach())
