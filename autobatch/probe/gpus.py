"""The GPUs an estimate knows: vendor peak figures (dense, no sparsity) per GPU model.

`GPU_SPECS` is keyed by the names a device list uses ("2xA100-80GB,4xT4-16GB"); each
entry cites the datasheet its figures come from. Memory is the total NVML reports,
a little under the nominal size.
"""

from __future__ import annotations

from dataclasses import dataclass

TF, GBs, MiB = 1e12, 1e9, 2**20


@dataclass(frozen=True)
class GpuSpec:
    """Vendor peak figures (dense, no sparsity) of one GPU model."""

    name: str
    memory_bytes: int  # total as nvidia-smi / NVML report it (a little under the nominal size)
    fp32_flops: float  # FP32 (TF32 is off for matmuls by default in PyTorch)
    fp16_flops: float  # FP16 tensor cores, FP32 accumulate
    bf16_flops: float | None  # BF16 tensor cores; None: no bf16
    bandwidth: float  # bytes/s
    compute_capability: tuple[int, int]

    is_cuda = True

    @property
    def bf16_supported(self) -> bool:
        return self.bf16_flops is not None


def _gpu(name, mib, fp32, fp16, bf16, bw, cc):  # noqa: ANN001, ANN202
    return GpuSpec(name, mib * MiB, fp32 * TF, fp16 * TF, bf16 and bf16 * TF, bw * GBs, cc)


GPU_SPECS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        # NVIDIA A100 Tensor Core GPU datasheet (SXM4): 19.5 TF FP32, 312 TF BF16/FP16,
        # 1,555 GB/s (40GB) and 2,039 GB/s (80GB) HBM2e.
        _gpu("A100-40GB", 40960, 19.5, 312, 312, 1555, (8, 0)),
        _gpu("A100-80GB", 81920, 19.5, 312, 312, 2039, (8, 0)),
        # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 67 TF FP32, 989 TF BF16/FP16 dense
        # (1,979 with sparsity), 3.35 TB/s HBM3.
        _gpu("H100-80GB", 81559, 67, 989, 989, 3350, (9, 0)),
        # NVIDIA L4 datasheet: 30.3 TF FP32, 121 TF BF16/FP16 dense (242 sparse), 300 GB/s.
        _gpu("L4-24GB", 23034, 30.3, 121, 121, 300, (8, 9)),
        # NVIDIA T4 datasheet: 8.1 TF FP32, 65 TF mixed FP16/FP32, 320 GB/s; no bf16.
        _gpu("T4-16GB", 15360, 8.1, 65, None, 320, (7, 5)),
        # NVIDIA V100 datasheet (SXM2): 15.7 TF FP32, 125 TF tensor (FP16), 900 GB/s; no bf16.
        _gpu("V100-16GB", 16160, 15.7, 125, None, 900, (7, 0)),
        _gpu("V100-32GB", 32480, 15.7, 125, None, 900, (7, 0)),
        # NVIDIA A10 datasheet: 31.2 TF FP32, 125 TF BF16/FP16 dense (250 sparse), 600 GB/s.
        _gpu("A10-24GB", 23028, 31.2, 125, 125, 600, (8, 6)),
        # NVIDIA L40S datasheet: 91.6 TF FP32, 362 TF BF16/FP16 dense (733 sparse), 864 GB/s.
        _gpu("L40S-48GB", 46068, 91.6, 362, 362, 864, (8, 9)),
        # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 82.6 TF FP32,
        # 165.2 TF FP16/BF16 tensor with FP32 accumulate (dense), 1,008 GB/s GDDR6X.
        _gpu("RTX4090-24GB", 24564, 82.6, 165.2, 165.2, 1008, (8, 9)),
    )
}
