"""The optimizer and the learning-rate schedule a job spec names, built for a model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from launcher.job.spec import OptimizerSpec, ScheduleSpec


def build_optimizer(spec: OptimizerSpec) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        if spec.name == "adamw":
            return torch.optim.AdamW(
                model.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
            )
        return torch.optim.SGD(
            model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )

    return make


def build_schedule(
    spec: ScheduleSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    def factor(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
        if spec.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if spec.name == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
