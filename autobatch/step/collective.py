"""Where a small collective's tensor lives (a loss sum, a norm, a flag, a step count)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(device: torch.device) -> torch.device:
    """The rank's GPU under nccl (which reduces only GPU tensors), else the CPU."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return device if nccl else torch.device("cpu")
