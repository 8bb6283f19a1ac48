"""Inventory (with a fake NVML: every field, UUID matching, no driver) and device-list parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from autobatch.errors import ProbeError
from autobatch.probe.devices import (
    DeviceInfo,
    DeviceSpecError,
    SimulatedDevice,
    cpu_device,
    inventory,
    normalise_speeds,
    parse_devices,
    parse_memory,
    parse_simulated,
)
from autobatch.step.precision import choose_precision

GiB, MiB = 2**30, 2**20


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 (pynvml's name)
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    pass


@dataclass
class FakeGpu:
    uuid: str
    name: str | bytes
    total: int
    used: int
    cc: tuple[int, int] | None  # None: the driver raises NotSupported
    bus: str | bytes


class FakeNVML:
    """The part of pynvml that `inventory` uses, over a list of fake GPUs, in NVML order."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], *, init_error: Exception | None = None) -> None:
        self.gpus, self.init_error = gpus, init_error
        self.initialised = self.shut_down = False

    def nvmlInit(self) -> None:  # noqa: N802
        if self.init_error is not None:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:  # noqa: N802
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:  # noqa: N802
        return h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> str | bytes:  # noqa: N802
        return h.name

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGpu) -> tuple[int, int]:  # noqa: N802
        if h.cc is None:
            raise NVMLError_NotSupported("Not Supported")
        return h.cc

    def nvmlDeviceGetPciInfo(self, h: FakeGpu) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(busId=h.bus)


A100 = FakeGpu(
    "GPU-aaaa-1111", "NVIDIA A100-SXM4-80GB", 80 * GiB, 3 * GiB, (8, 0), "00000000:07:00.0"
)
T4 = FakeGpu("GPU-bbbb-2222", b"Tesla T4", 15 * GiB, 1 * GiB, (7, 5), b"00000000:3B:00.0")
OLD = FakeGpu("GPU-cccc-3333", "Old GPU", 8 * GiB, 0, None, "00000000:86:00.0")


def test_inventory_reports_every_field_of_every_gpu():
    nvml = FakeNVML([A100, T4])
    a100, t4 = inventory(nvml, cuda_uuids=["aaaa-1111", "bbbb-2222"])
    assert a100.index == 0 and a100.uuid == "GPU-aaaa-1111" and a100.name == "NVIDIA A100-SXM4-80GB"
    assert (a100.total_bytes, a100.used_bytes, a100.free_bytes) == (80 * GiB, 3 * GiB, 77 * GiB)
    assert a100.compute_capability == (8, 0) and a100.bf16_supported
    assert a100.pci_bus_id == "00000000:07:00.0" and a100.torch_device == "cuda:0"
    assert not a100.simulated and a100.is_cuda
    # bytes from older bindings are decoded; Turing has no bf16
    assert t4.name == "Tesla T4" and t4.pci_bus_id == "00000000:3B:00.0"
    assert t4.compute_capability == (7, 5) and not t4.bf16_supported
    assert nvml.initialised and nvml.shut_down


def test_inventory_matches_torch_devices_by_uuid_not_by_nvml_order():
    # CUDA_VISIBLE_DEVICES hides the A100, and CUDA numbers the old GPU before the T4
    nvml = FakeNVML([A100, T4, OLD])
    devices = inventory(nvml, cuda_uuids=["cccc-3333", "GPU-BBBB-2222"])
    assert [(d.name, d.index, d.torch_device) for d in devices] == [
        ("Old GPU", 2, "cuda:0"),  # CUDA-visible first, in CUDA order
        ("Tesla T4", 1, "cuda:1"),  # torch's UUID has no 'GPU-' prefix; case does not matter
        ("NVIDIA A100-SXM4-80GB", 0, None),  # NVML sees it, this process cannot use it
    ]
    assert devices[0].compute_capability is None and not devices[0].bf16_supported


@pytest.mark.parametrize(
    "nvml",
    [
        FakeNVML([], init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found")),
        FakeNVML([], init_error=OSError("libnvidia-ml.so.1: cannot open shared object file")),
        FakeNVML([]),  # a driver, but no GPU
    ],
    ids=["no-library", "loader-error", "no-gpu"],
)
def test_inventory_falls_back_to_the_cpu_without_an_error(nvml):
    (device,) = inventory(nvml, cuda_uuids=[])
    assert device.torch_device == "cpu" and device.uuid == "cpu" and not device.simulated
    assert 0 < device.free_bytes <= device.total_bytes


def test_inventory_with_the_real_pynvml_on_this_driverless_machine_is_the_cpu():
    pytest.importorskip("pynvml")
    devices = inventory()
    if devices[0].is_cuda:
        pytest.skip("this machine has an NVIDIA driver")
    assert [d.torch_device for d in devices] == ["cpu"]
    assert devices[0].name == cpu_device().name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GB", 80 * 10**9),  # decimal units are powers of 1000
        ("512MiB", 512 * MiB),  # binary units are powers of 1024
        ("1.5GiB", 3 * GiB // 2),  # fractions
        ("2 kib", 2048),  # case and spaces do not matter
        ("4096", 4096),  # no unit: bytes
        ("1TB", 10**12),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80XB", "", "GB", "-1GB", "1e9", "0.1B"])
def test_parse_memory_rejects_what_is_not_a_size(text):
    with pytest.raises(
        DeviceSpecError, match=r"(is not a size: write a number and a unit|at least 1 byte)"
    ):
        parse_memory(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2xA100-80GB,4xT4-16GB", ["A100-80GB"] * 2 + ["T4-16GB"] * 4),  # the documented form
        ("a100_80gb", ["A100-80GB"]),  # case, '_' and spaces are normalised
        (" 3 x L4-24GB , T4-16GB", ["L4-24GB"] * 3 + ["T4-16GB"]),  # spaces around items
        ("2*H100-80GB", ["H100-80GB"] * 2),  # '*' works as 'x'
    ],
)
def test_parse_devices(text, expected):
    known = ["A100-80GB", "T4-16GB", "L4-24GB", "H100-80GB"]
    assert parse_devices(text, known=known) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2xB200-192GB", r"unknown GPU 'B200-192GB' in '2xB200-192GB'; known: A100-80GB, T4-16GB"),
        ("0xT4-16GB", r"count 0 in '0xT4-16GB' must be >= 1"),
        ("A100-80GB,", r"empty item '' in device list"),
        ("  ", r"the device list is empty"),
        ("sim:1GiB", r"'sim:1GiB' looks like a simulated device"),
    ],
)
def test_parse_devices_errors_name_the_bad_item_and_what_is_allowed(text, message):
    with pytest.raises(DeviceSpecError, match=message):
        parse_devices(text, known=["A100-80GB", "T4-16GB"])


def test_parse_simulated_expands_counts_and_reads_memory_and_speed():
    devices = parse_simulated("2xsim-big:512MiB:1.0, sim-small:128MB:0.5, tiny:1GiB")
    assert devices == [
        SimulatedDevice("sim-big", 512 * MiB, 1.0),
        SimulatedDevice("sim-big", 512 * MiB, 1.0),
        SimulatedDevice("sim-small", 128 * 10**6, 0.5),
        SimulatedDevice("tiny", GiB, 1.0),  # speed defaults to 1
    ]
    info = devices[2].info(index=2)
    assert info.simulated and info.torch_device == "cpu" and info.speed == 0.5
    assert info.total_bytes == info.free_bytes == 128 * 10**6 and info.uuid == "SIM-sim-small-2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sim", r"simulated device 'sim' must be 'name:memory' or 'name:memory:speed'"),
        ("sim:1GiB:fast", r"speed 'fast' in 'sim:1GiB:fast' is not a number"),
        ("sim:1GiB:0", r"sim: speed=0.0 must be a number > 0"),
        ("sim:lots", r"memory 'lots' in 'sim:lots' is not a size"),
        ("my sim:1GiB", r"simulated device name 'my sim' is not allowed"),
        ("a:1:2:3", r"must be 'name:memory' or 'name:memory:speed'"),
    ],
)
def test_parse_simulated_errors(text, message):
    with pytest.raises(DeviceSpecError, match=message):
        parse_simulated(text)


def test_spec_errors_are_probe_errors_and_value_errors():
    assert issubclass(DeviceSpecError, ProbeError) and issubclass(DeviceSpecError, ValueError)


def test_normalise_speeds_caps_the_fastest_at_one_and_keeps_slow_devices_slow():
    devices = [SimulatedDevice("a", GiB, 4.0), SimulatedDevice("b", GiB, 1.0)]
    assert [d.speed for d in normalise_speeds(devices)] == [1.0, 0.25]
    alone = [SimulatedDevice("t4", GiB, 0.25)]
    assert [d.speed for d in normalise_speeds(alone)] == [0.25]
    assert normalise_speeds([]) == []


def _gpu(name: str, cc: tuple[int, int] | None, cuda: bool = True) -> DeviceInfo:
    return DeviceInfo(
        index=0,
        uuid=f"GPU-{name}",
        name=name,
        total_bytes=GiB,
        free_bytes=GiB,
        used_bytes=0,
        compute_capability=cc,
        bf16_supported=cc is not None and cc >= (8, 0),
        pci_bus_id=None,
        torch_device="cuda:0" if cuda else "cpu",
    )


@pytest.mark.parametrize(
    "devices, precision, why",
    [
        ([_gpu("A100", (8, 0)), _gpu("L4", (8, 9))], "bf16", r"every device supports bf16"),
        ([_gpu("A100", (8, 0)), _gpu("T4", (7, 5))], "fp16", r"T4 \(compute capability 7.5\)"),
        ([_gpu("A100", (8, 0)), _gpu("cpu", None, cuda=False)], "fp32", r"cpu is not a GPU"),
    ],
)
def test_auto_precision_is_what_every_device_supports_and_says_why(devices, precision, why):
    got, reason = choose_precision(devices)
    assert got == precision
    assert re.search(why, reason)
