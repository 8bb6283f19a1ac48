"""A device's memory budget for one job: what torch may hold, less what a probe cannot see.

budget = usable - headroom - reserve. *usable* is what torch may hold: on CUDA the
free memory after this process's context plus torch's own reserved memory, capped
by `set_per_process_memory_fraction`; a simulated device's declared memory; a
CPU's available RAM. The *reserve* is what the measurement cannot see: what the
process group takes, by its `backend` (DDP's gradient buckets for either; NCCL's
buffers for "nccl" only: a gloo group, e.g. several ranks on one GPU, holds its
buffers in host memory), the allocator's fragmentation (reserved minus allocated
at the peak, measured), and the caller's extra reserve. The CUDA context is
already outside the free memory.
"""

from __future__ import annotations

from typing import Literal

import torch

from autobatch.errors import ProbeError
from autobatch.probe.devices import DeviceInfo
from autobatch.probe.measure import StepMeasurement

# NCCL communicator buffers per process: NCCL_BUFFSIZE (4 MiB) x channels x peers, plus
# its device-side structures; a few hundred MiB on typical nodes. A stated allowance.
NCCL_RESERVE_BYTES = 256 * 2**20
Backend = Literal["nccl", "gloo"]  # the process group's backend, for its reserve
BACKENDS = ("nccl", "gloo")


def check_backend(backend: str | None) -> Backend | None:
    """`backend` if it is a process group's backend (None: one process), else a ProbeError."""
    if backend is not None and backend not in BACKENDS:
        raise ProbeError(f"backend={backend!r} must be one of {BACKENDS} or None (one process)")
    return backend


def comm_reserve(backend: Backend | None, gradient_bytes: int) -> list[tuple[str, int]]:
    """What a process group on `backend` holds on the device that a probe cannot see."""
    if backend is None:
        return []
    reserve = [("ddp_gradient_buckets", gradient_bytes)]
    if backend == "nccl":
        reserve.append(("nccl_buffers", NCCL_RESERVE_BYTES))
    return reserve


def usable_bytes(info: DeviceInfo) -> int:
    """Bytes torch may hold on the device for this job (see the module docstring)."""
    if info.simulated:
        return info.total_bytes
    if info.is_cuda:
        dev = torch.device(info.torch_device)
        free, total = torch.cuda.mem_get_info(dev)  # creates the context: this process trains
        usable = free + torch.cuda.memory_reserved(dev)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:
            usable = min(usable, int(fraction(dev) * total))
        return usable
    return info.free_bytes


class Budget:
    """The budget after the fragmentation measured so far (CUDA; zero elsewhere)."""

    def __init__(self, before_fragmentation: int) -> None:
        self.base = before_fragmentation

    @staticmethod
    def fragmentation(measurements: list[StepMeasurement] | tuple) -> int:
        return max((m.fragmentation_bytes for m in measurements), default=0)

    def of(self, measurements: list[StepMeasurement] | tuple) -> int:
        return self.base - self.fragmentation(measurements)
