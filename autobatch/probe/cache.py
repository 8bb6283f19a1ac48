"""The on-disk profile cache: keyed by what changes a profile, written atomically.

A key holds the model's fingerprint, the sample shape, precision, optimizer,
device type and torch version (and `profile_model` adds gradient checkpointing and the
search's cap); a hit lets the probe re-derive the largest
micro-batch for the current budget without running a step.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from autobatch.probe.devices import DeviceInfo
from autobatch.probe.measure import MakeOptimizer, StepMeasurement
from autobatch.tasks.task import Task, model_fingerprint

PROFILE_FORMAT_VERSION = 3  # 2: gradient checkpointing, padded probe batches; 3: warm timings


def default_cache_dir() -> str:
    """Where profiles are cached: AUTOBATCH_PROFILE_CACHE, else ~/.cache/autobatch/profiles."""
    default = Path.home() / ".cache" / "autobatch" / "profiles"
    return os.environ.get("AUTOBATCH_PROFILE_CACHE", str(default))


def key_fields(
    task: Task, info: DeviceInfo, make_optimizer: MakeOptimizer, precision: str
) -> tuple[dict[str, Any], int]:
    """What changes a profile, and the model's gradient bytes (for the DDP reserve)."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = task.build_model()
    except Exception:  # a model that cannot be built on meta: build it for real
        model = task.build_model()
    optimizer = make_optimizer(model)
    flags = {k: v for k, v in optimizer.defaults.items() if isinstance(v, (bool, str, type(None)))}
    sample = task.probe_batch(1)
    leaves = sample.values() if isinstance(sample, dict) else sample
    leaves = [sample] if isinstance(sample, torch.Tensor) else list(leaves)
    fields = {
        "format": PROFILE_FORMAT_VERSION,
        "model": model_fingerprint(model),
        "sample": [f"{tuple(t.shape)}:{t.dtype}" for t in leaves if isinstance(t, torch.Tensor)],
        "precision": precision,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "optimizer_flags": flags,
        "device": info.name,
        "device_memory": info.total_bytes,
        "simulated": info.simulated,
        "speed": info.speed,
        "torch": torch.__version__,
    }
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return fields, grads


def _path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"profile-{key}.json"


def load(cache_dir: str | os.PathLike | None, key: str) -> list[StepMeasurement] | None:
    if cache_dir is None:
        return None
    try:
        data = json.loads(_path(cache_dir, key).read_text())
    except (OSError, ValueError):
        return None
    if data.get("format_version") != PROFILE_FORMAT_VERSION:
        return None
    try:
        return [StepMeasurement.from_dict(m) for m in data["measurements"]]
    except (KeyError, TypeError):  # written by another version: measure again
        return None


def store(cache_dir: str | os.PathLike | None, key: str, fields: dict, measurements: list) -> None:
    """Write atomically (temp file + rename): concurrent probes never see half a file."""
    if cache_dir is None:
        return
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    data = {
        "format_version": PROFILE_FORMAT_VERSION,
        "key": fields,
        "measurements": [asdict(m) for m in measurements],
    }
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".profile-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, _path(cache_dir, key))
