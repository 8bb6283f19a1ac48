"""The devices of a node: real GPUs from NVML, the CPU, and declared simulated devices.

`inventory()` lists every GPU NVML sees, matched to its torch device by UUID
(NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES; CUDA numbers
only the visible ones, fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID). A GPU
this process cannot use has ``torch_device=None``. Without a driver (or without
any GPU) it returns the CPU, without an error.

Memory comes from NVML, which creates no CUDA context. Matching UUIDs asks
torch for its devices' properties, which initialises the CUDA driver (not a
context) in this process: CUDA does not survive a fork, so run `inventory()` in
the process that will use the GPU, or pass `cuda_uuids` from there. Never call
`torch.cuda.mem_get_info()` in a parent that forks: it creates a context.

Device lists are written as text, on the command line or in a job spec::

    devices    := item ("," item)*
    item       := [count "x"] device                 2xA100-80GB    3 x sim:1GiB
    device     := known-gpu                           A100-80GB, T4-16GB (autobatch.probe.estimate)
    simulated  := name ":" memory [":" speed]         sim-big:512MiB:1.0
    memory     := number unit                         80GB = 80e9 B, 512MiB = 512 * 2**20 B

Units B, KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024.
Speeds are relative to this machine (default 1.0); `normalise_speeds` caps them at 1.
"""

from __future__ import annotations

import math
import os
import platform
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from types import ModuleType

from autobatch.errors import DeviceSpecError


@dataclass(frozen=True)
class DeviceInfo:
    """One device as the probe sees it. Memory figures are bytes, at inventory time."""

    index: int  # NVML index for GPUs (not the CUDA index), 0 for the CPU
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    compute_capability: tuple[int, int] | None
    bf16_supported: bool
    pci_bus_id: str | None
    torch_device: str | None  # "cuda:0", "cpu"; None: NVML sees it, this process cannot use it
    simulated: bool = False
    speed: float = 1.0  # relative speed; < 1 only for simulated devices

    @property
    def is_cuda(self) -> bool:
        return self.torch_device is not None and self.torch_device.startswith("cuda")


@dataclass(frozen=True)
class SimulatedDevice:
    """A device that does not exist: the CPU, limited to `memory_bytes` and slowed to `speed`."""

    name: str
    memory_bytes: int
    speed: float = 1.0

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise DeviceSpecError(
                f"simulated device name {self.name!r} is not allowed: use letters, digits, "
                "'-', '_' and '.'"
            )
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int):
            raise DeviceSpecError(f"{self.name}: memory_bytes={self.memory_bytes!r} must be an int")
        if self.memory_bytes < 1:
            raise DeviceSpecError(f"{self.name}: memory_bytes={self.memory_bytes} must be >= 1")
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise DeviceSpecError(f"{self.name}: speed={self.speed!r} must be a number > 0")

    @classmethod
    def from_spec(cls, text: str) -> SimulatedDevice:
        """One device from 'name:memory[:speed]', e.g. 'sim-big:512MiB:0.5'."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3):
            raise DeviceSpecError(
                f"simulated device {text!r} must be 'name:memory' or 'name:memory:speed', "
                "e.g. 'sim-big:512MiB:0.5'"
            )
        speed = 1.0
        if len(parts) == 3:
            try:
                speed = float(parts[2])
            except ValueError:
                raise DeviceSpecError(
                    f"speed {parts[2]!r} in {text!r} is not a number: give a relative speed > 0, "
                    "e.g. 0.5"
                ) from None
        return cls(parts[0].strip(), parse_memory(parts[1], context=text), speed)

    def info(self, index: int = 0) -> DeviceInfo:
        """The device as the probe and the training loop see it (a CPU device, marked simulated)."""
        return DeviceInfo(
            index=index,
            uuid=f"SIM-{self.name}-{index}",
            name=self.name,
            total_bytes=self.memory_bytes,
            free_bytes=self.memory_bytes,
            used_bytes=0,
            compute_capability=None,
            bf16_supported=True,
            pci_bus_id=None,
            torch_device="cpu",
            simulated=True,
            speed=self.speed,
        )


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_ITEM = re.compile(r"\s*(?:(\d+)\s*[xX*]\s*)?(.*?)\s*")


def parse_memory(text: str, *, context: str | None = None) -> int:
    """'80GB' -> 80_000_000_000, '512MiB' -> 536_870_912, '1024' -> 1024 bytes."""
    m = _MEMORY.fullmatch(text)
    if m is None:
        where = f" in {context!r}" if context and context != text else ""
        raise DeviceSpecError(
            f"memory {text!r}{where} is not a size: write a number and a unit, B, KB, MB, GB, TB "
            "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '512MiB' or '80GB'"
        )
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1:
        raise DeviceSpecError(f"memory {text!r} must be at least 1 byte")
    return int(value)


def _items(text: str) -> list[tuple[int, str]]:
    """'2xA, B' -> [(2, 'A'), (1, 'B')]; errors name the bad item."""
    if not text or not text.strip():
        raise DeviceSpecError("the device list is empty: give e.g. '2xA100-80GB,4xT4-16GB'")
    out = []
    for raw in text.split(","):
        m = _ITEM.fullmatch(raw)
        count, body = (int(m.group(1)) if m.group(1) else 1), m.group(2)
        if not body:
            raise DeviceSpecError(f"empty item {raw!r} in device list {text!r}")
        if count < 1:
            raise DeviceSpecError(f"count {m.group(1)} in {raw.strip()!r} must be >= 1")
        out.append((count, body))
    return out


def canonical_gpu_name(name: str) -> str:
    """'a100_80gb' -> 'A100-80GB': upper case, '-' for spaces and underscores."""
    return re.sub(r"[\s_]+", "-", name.strip()).upper()


def parse_devices(text: str, *, known: Collection[str] | None = None) -> list[str]:
    """'2xA100-80GB,4xT4-16GB' -> six canonical GPU names, in order.

    With `known`, every name must be one of them (compared case-insensitively).
    """
    known_canon = {canonical_gpu_name(k): k for k in known} if known is not None else None
    names = []
    for count, body in _items(text):
        if ":" in body:
            raise DeviceSpecError(
                f"{body!r} looks like a simulated device; this list takes GPU names such as "
                "'A100-80GB' (simulated devices go in the simulated list)"
            )
        canon = canonical_gpu_name(body)
        if known_canon is not None:
            if canon not in known_canon:
                raise DeviceSpecError(
                    f"unknown GPU {body!r} in {text!r}; known: {', '.join(sorted(known_canon))}"
                )
            canon = known_canon[canon]
        names += [canon] * count
    return names


def parse_simulated(text: str) -> list[SimulatedDevice]:
    """'2xsim-big:512MiB:1.0,sim-small:128MiB:0.5' -> three simulated devices."""
    out = []
    for count, body in _items(text):
        out += [SimulatedDevice.from_spec(body)] * count
    return out


def normalise_speeds(devices: Sequence[SimulatedDevice]) -> list[SimulatedDevice]:
    """Speeds relative to this machine, at most 1: divided by the fastest when it is above 1
    (a device cannot run faster than the machine). A speed means the same in every job,
    so a slow device alone runs as slowly as in a mix."""
    if not devices:
        return []
    fastest = max(1.0, *(d.speed for d in devices))
    return [replace(d, speed=d.speed / fastest) for d in devices]


# ---------------------------------------------------------------------------
# inventory


def inventory(
    nvml_module: ModuleType | None = None, *, cuda_uuids: Sequence[str] | None = None
) -> list[DeviceInfo]:
    """Every GPU of this node (CUDA-visible ones first, in CUDA order), or the CPU.

    `nvml_module` replaces `pynvml` (tests pass a fake). `cuda_uuids` are the
    UUIDs of cuda:0, cuda:1, ... as this process sees them; by default they are
    read from torch (see the module docstring about fork).
    """
    nvml = nvml_module
    if nvml is None:
        try:
            import pynvml as nvml  # the nvidia-ml-py package
        except ImportError:
            return [cpu_device()]
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no GPU here
        return [cpu_device()]
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return [cpu_device()]
        if cuda_uuids is None:
            cuda_uuids = _torch_cuda_uuids()
        cuda_index = {_uuid_key(u): i for i, u in enumerate(cuda_uuids)}
        gpus = [_gpu_info(nvml, i, cuda_index) for i in range(count)]
    finally:
        nvml.nvmlShutdown()
    order = {g.uuid: cuda_index.get(_uuid_key(g.uuid), len(cuda_index) + g.index) for g in gpus}
    return sorted(gpus, key=lambda g: order[g.uuid])


def _gpu_info(nvml: ModuleType, i: int, cuda_index: dict[str, int]) -> DeviceInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(i)
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    cc = _optional(lambda: tuple(int(x) for x in nvml.nvmlDeviceGetCudaComputeCapability(handle)))
    pci = _optional(lambda: _text(nvml.nvmlDeviceGetPciInfo(handle).busId))
    idx = cuda_index.get(_uuid_key(uuid))
    return DeviceInfo(
        index=i,
        uuid=uuid,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(mem.total),
        free_bytes=int(mem.free),
        used_bytes=int(mem.used),
        compute_capability=cc,
        bf16_supported=cc is not None and cc >= (8, 0),  # Ampere and later
        pci_bus_id=pci,
        torch_device=None if idx is None else f"cuda:{idx}",
    )


def _optional(read):  # noqa: ANN001, ANN202  (a field some GPUs or drivers do not report)
    try:
        return read()
    except Exception:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _uuid_key(uuid: str) -> str:
    """NVML says 'GPU-6f2a...', torch says '6f2a...': compare without the prefix."""
    u = uuid.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def _torch_cuda_uuids() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def cpu_device() -> DeviceInfo:
    """The CPU as a device: host memory from the OS, bf16 through autocast."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    free = _meminfo_available() or os.sysconf("SC_AVPHYS_PAGES") * page
    return DeviceInfo(
        index=0,
        uuid="cpu",
        name=_cpu_name(),
        total_bytes=total,
        free_bytes=free,
        used_bytes=total - free,
        compute_capability=None,
        bf16_supported=True,
        pci_bus_id=None,
        torch_device="cpu",
    )


def host_stand_in(device: DeviceInfo) -> DeviceInfo:
    """This host's CPU standing in for `device` where not one sample of a replica fits the
    device: a simulated device named "host", of half the host's physical memory, at the
    device's speed. What it measures of a replica (the model's state and a sample's
    activations, in tensor bytes) is what a sharded plan needs; its times are the CPU's
    (for a GPU, far off until the ranks' measured compute rebalances the plan).

    >>> host_stand_in(SimulatedDevice("sim-t4", 2**20, 0.25).info()).speed
    0.25
    """
    page = os.sysconf("SC_PAGE_SIZE")
    return SimulatedDevice("host", os.sysconf("SC_PHYS_PAGES") * page // 2, device.speed).info()


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
