"""Training precision: the names, the autocast context, and the choice for a mix of devices.

One definition for the step, the probe's measured step and the estimate's traced
step: fp32, bf16 autocast, or fp16 autocast (with a loss scaler in the step).
`choose_precision` resolves `precision: auto` for the launcher (measured devices)
and the estimate (declared GPUs) alike: bf16 where every device has it, else fp16,
fp32 when a device is not a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal, Protocol

import torch

from autobatch.errors import ProbeError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


class PrecisionDevice(Protocol):
    """What the precision choice needs to know of a device (a DeviceInfo, a GpuSpec)."""

    @property
    def name(self) -> str: ...
    @property
    def is_cuda(self) -> bool: ...
    @property
    def bf16_supported(self) -> bool: ...
    @property
    def compute_capability(self) -> tuple[int, int] | None: ...


def check_precision(precision: str) -> Precision:
    """`precision` if it names a training precision, else a ValueError naming the choices."""
    if precision not in PRECISIONS:
        allowed = ", ".join(repr(p) for p in PRECISIONS)
        raise ValueError(f"precision={precision!r} must be one of {allowed}")
    return precision  # type: ignore[return-value]


def check_supported(device: PrecisionDevice, precision: str) -> None:
    """A ProbeError when `device` cannot train in `precision` (bf16 needs compute capability
    8.0), saying what to use instead."""
    try:
        check_precision(precision)
    except ValueError as exc:
        raise ProbeError(str(exc)) from None
    if precision == "bf16" and not device.bf16_supported:
        raise ProbeError(
            f"{device.name} has no bf16 (compute capability {device.compute_capability}, bf16 "
            "needs >= (8, 0)): use precision 'fp16' or 'fp32', or leave this device out"
        )


def choose_precision(devices: Sequence[PrecisionDevice]) -> tuple[Precision, str]:
    """The training precision for a mix of devices, and why: bf16 autocast where every
    device has it (compute capability >= 8.0), fp16 with a loss scaler on older GPUs
    (the scaler's skip decision follows the all-reduced gradients, so it is the same on
    every rank), fp32 when a device is not a GPU."""
    if not devices:
        raise ProbeError("choose_precision needs at least one device")
    not_gpu = [d.name for d in devices if not d.is_cuda]
    if not_gpu:
        return "fp32", f"{not_gpu[0]} is not a GPU: fp32"
    old = [d for d in devices if not d.bf16_supported]
    if old:
        cc = old[0].compute_capability
        at = f" (compute capability {cc[0]}.{cc[1]})" if cc else ""
        return "fp16", f"{old[0].name}{at} has no bf16: fp16 autocast with a loss scaler"
    return "bf16", "every device supports bf16 (compute capability >= 8.0): bf16 autocast"


def autocast(device_type: str, precision: Precision) -> contextlib.AbstractContextManager:
    """The forward's autocast context for `precision` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)
