"""Hugging Face Accelerate as the step's wrapping: `accelerator.prepare` wraps the model,
`accelerator.no_sync` holds every micro-step's gradients but the last.

    accelerator = Accelerator()
    plan = plan_for_group(task, B, make_optimizer=make_optimizer)   # the group Accelerate set up
    wrapping = AccelerateWrapping(accelerator)
    acc = Accumulator(wrapping.wrap(model, accelerator.device), optimizer, wrapping=wrapping)

Accelerate's own gradient accumulation assumes the same number of micro-steps on
every rank, and its mixed precision scales the loss in `accelerator.backward`,
which the accumulator does not call: leave `gradient_accumulation_steps` at 1 and
`mixed_precision` at "no", and give the accumulator its `precision` instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class AccelerateWrapping:
    """The `ModelWrapping` of a model prepared by an `accelerate.Accelerator`."""

    def __init__(self, accelerator: Any) -> None:
        steps = accelerator.gradient_accumulation_steps
        if steps != 1:
            raise ValueError(
                f"Accelerator(gradient_accumulation_steps={steps}): leave it at 1; the plan "
                "gives each rank its own number of micro-steps"
            )
        if str(accelerator.mixed_precision) != "no":
            raise ValueError(
                f"Accelerator(mixed_precision={accelerator.mixed_precision!r}): leave it at "
                "'no' and give the Accumulator precision='bf16' or 'fp16' instead (it scales "
                "the loss itself; accelerator.backward is not called)"
            )
        self.accelerator = accelerator

    def wrap(self, model: nn.Module, device: torch.device | None = None) -> nn.Module:
        """The model as Accelerate prepares it (DDP over its process group); Accelerate
        places it on its own device."""
        return self.accelerator.prepare(model)

    def micro_step(self, wrapped: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.accelerator.no_sync(wrapped)

    def world_size(self, wrapped: nn.Module) -> int:
        return self.accelerator.num_processes
