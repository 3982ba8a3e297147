"""Optimiser with parameter groups, and learning-rate schedules stepped every iteration."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Two groups: weights of convolutions and linear layers decay; normalisation weights and biases
    (every parameter with fewer than two dimensions) do not, unless ``decay_norm_and_bias``.

    Decaying BN scales only changes the effective learning rate of the layer before them and biases
    have no scale to regularise (Goyal et al. 2017, sec. 5.1; the airbench and timm defaults).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay, config.decay_norm_and_bias)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))


def lr_factor(step: int, total: int, warmup: int, config: TrainConfig) -> float:
    """The multiplier of the peak rate at iteration ``step`` of ``total`` (after ``warmup`` steps)."""
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        # He et al. 2015 divide by 10 at 32k and 48k of 64k iterations: milestones 0.5 and 0.75.
        return 0.1 ** sum(step >= m * total for m in config.milestones)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if config.schedule == "linear":
        # Straight to zero: for a fixed budget of steps, a linear decay matches or beats cosine
        # (Li et al. 2020, "Budgeted training"; Defazio et al. 2023, "When, why and how much?").
        return 1.0 - progress
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        # Smith & Topin 2017: rise to the peak over the first 25%, cosine down, momentum cycled inversely.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.lr,
            total_steps=total,
            pct_start=0.25,
            cycle_momentum=config.optimizer == "sgd",
        )
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, config))
