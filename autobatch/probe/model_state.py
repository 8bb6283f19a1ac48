"""The model's state in bytes, for sharding: parameters, gradients, optimizer state, units.

Parameter and gradient bytes come from the model (each parameter once); the
optimizer's state from a step of the optimizer on the model built on the `meta`
device (no memory), or from the measured model when that fails; the sharding units
are the blocks `Sharded(blocks=)` wraps one by one, then the root with the rest.
The planner's memory model (`autobatch.planning.memory`) moves this state between
ranks by sharding mode.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from autobatch.planning.memory import ModelState
from autobatch.probe.measure import MakeOptimizer
from autobatch.step.shard import BlocksFn, repeated_blocks, unit_bytes
from autobatch.tasks.task import Task


def model_state(
    model: nn.Module, optimizer_bytes: int, blocks: BlocksFn = repeated_blocks
) -> ModelState:
    """Parameter and gradient bytes of `model` (each parameter once), its optimizer's
    state bytes as given, and its sharding units as `Sharded(blocks=blocks)` wraps them
    (each block, then the root with the rest)."""
    params = {id(p): p for p in model.parameters()}
    largest, root = unit_bytes(model, blocks)
    return ModelState(
        params_bytes=_nbytes(params.values()),
        grads_bytes=_nbytes(p for p in params.values() if p.requires_grad),
        optimizer_bytes=optimizer_bytes,
        largest_unit_bytes=largest,
        root_unit_bytes=root,
    )


def meta_model_state(
    task: Task, make_optimizer: MakeOptimizer, blocks: BlocksFn = repeated_blocks
) -> ModelState | None:
    """`model_state` of the task's model built on the `meta` device (no memory), its
    optimizer state counted after one step there; None when the model or its optimizer
    cannot run on `meta` (e.g. fused kernels). Step counters the optimizer keeps on the
    host (Adam's, unless capturable) are not device memory and are not counted."""
    try:
        with torch.device("meta"):
            model = task.build_model()
        optimizer = make_optimizer(model)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
    except Exception:  # any failure here only means: count it on the measured model instead
        return None
    tensors = (v for st in optimizer.state.values() for v in st.values())
    on_meta = [v for v in tensors if isinstance(v, torch.Tensor) and v.is_meta]
    return model_state(model, _nbytes(on_meta), blocks)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
