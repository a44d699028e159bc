"""Optimizer and learning-rate schedule built from OptimConfig.

The schedule is computed in closed form (warmup factor x epoch factor) so that it resumes exactly
from a checkpoint and combines warmup with every scheduler, plateau included.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cellseg.config import OptimConfig
from cellseg.errors import ConfigError

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def optimizer_settings(cfg: OptimConfig) -> dict[str, Any]:
    """The keyword arguments of ``OPTIMIZERS[cfg.name]`` that ``cfg`` sets."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name {cfg.name!r} is not one of {', '.join(map(repr, OPTIMIZERS))}")
    momentum = {"momentum": cfg.momentum} if cfg.name == "sgd" else {}
    return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **momentum}


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over the trainable parameters, as torch's fused
    implementation: one pass over each parameter per step, where the default loops over them
    with several elementwise operations each on the CPU (Adam's step about 0.4x the time for
    the demo model). cellseg's devices, the CPU and CUDA, both have it."""
    settings = optimizer_settings(cfg)
    return OPTIMIZERS[cfg.name](params, **settings, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping ``optimizer``'s implementation: torch would
    take the saved one (the for-loop, in a checkpoint from before the fused optimizers), which
    a gradient scaler built for a fused optimizer would then fail."""
    groups = [
        {**saved, "fused": own["fused"], "foreach": own["foreach"]}
        for saved, own in zip(state["param_groups"], optimizer.param_groups, strict=False)  # torch checks
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


class LRSchedule:
    """Linear warmup per iteration times a per-epoch factor (cosine, step, plateau or none)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, epochs: int, iters_per_epoch: int
    ) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.epochs = epochs
        self.warmup_iters = int(round(cfg.warmup_epochs * iters_per_epoch))
        self.iteration = 0
        self.epoch = 0
        self.factor = 1.0
        self.best = -math.inf
        self.bad_epochs = 0
        self._apply()

    def _apply(self) -> None:
        warm = min(1.0, (self.iteration + 1) / self.warmup_iters) if self.warmup_iters else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * self.factor * warm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step_iteration(self) -> None:
        """Advance one optimizer step (warmup progresses)."""
        self.iteration += 1
        self._apply()

    def step_epoch(self, metric: float | None) -> None:
        """Advance one epoch; ``metric`` (higher is better) drives the plateau scheduler, which
        holds its learning rate when there is none (a run without validation)."""
        self.epoch += 1
        name = self.cfg.scheduler
        if name in ("cosine", "step"):
            self.factor = self._closed_form_factor()
        elif name == "plateau" and metric is not None:
            if metric > self.best:
                self.best, self.bad_epochs = metric, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > self.cfg.plateau_patience:
                    self.factor *= self.cfg.plateau_factor
                    self.bad_epochs = 0
        self._apply()

    def _closed_form_factor(self) -> float:
        """The epoch factor of cosine and step, a function of the epoch and the total epochs."""
        if self.cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(self.epoch, self.epochs) / self.epochs))
        return self.cfg.gamma ** (self.epoch // self.cfg.step_size)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("iteration", "epoch", "factor", "best", "bad_epochs")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        if self.cfg.scheduler in ("cosine", "step"):
            # recomputed, not restored: a run resumed with more epochs follows the new schedule
            # (the stored cosine factor of a finished run is 0 and would freeze training)
            self.factor = self._closed_form_factor()
        self._apply()
