"""The actor that lives in one bundle: it finds its device, measures the job's model on it,
then trains as one rank.

Probing and training in the same process saves a process start (and a CUDA
context) per device, and the profile is measured in the process that trains.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import ray
import torch

from autobatch.probe.devices import DeviceInfo, SimulatedDevice, host_stand_in, inventory
from autobatch.probe.model_profile import search_cap
from autobatch.probe.profile import ModelProfile, profile_model
from autobatch.step.precision import Precision
from launcher.job.optim import build_optimizer
from launcher.job.spec import JobSpec
from launcher.job.tasks import load_task


@ray.remote
class DeviceWorker:
    def __init__(self) -> None:
        torch.set_num_threads(int(os.environ.get("AUTOBATCH_CPU_THREADS", "1")))

    def inventory(self, simulated: SimulatedDevice | None, index: int) -> tuple:
        info = resolve_device(simulated, index)
        ctx = ray.get_runtime_context()
        return info, ray.util.get_node_ip_address(), ctx.get_node_id()

    def node_devices(self) -> tuple[str, list[DeviceInfo]]:
        return ray.util.get_node_ip_address(), inventory()

    def profile(
        self,
        spec: JobSpec,
        precision: Precision,
        info: DeviceInfo,
        cache_dir: str | None,
        measure: bool = True,
    ) -> ModelProfile | None:
        """The device's profile (None: not cached, and `measure` is False)."""
        return probe(spec, precision, info, cache_dir, measure=measure)

    def host_profile(
        self, spec: JobSpec, precision: Precision, device: DeviceInfo, cache_dir: str | None
    ) -> ModelProfile:
        """The model measured on this node's CPU standing in for `device` (a replica does
        not fit it): `host_stand_in`."""
        return probe(spec, precision, host_stand_in(device), cache_dir)

    def address(self) -> tuple[str, int, int]:
        return ray.util.get_node_ip_address(), free_port(), os.getpid()

    def join(self, master: str, rank: int, world: int, backend: str, timeout_s: float) -> None:
        import torch.distributed as dist

        if world > 1:
            dist.init_process_group(
                backend,
                init_method=master,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout_s),
            )

    def train(self, ctx: Any, collector: Any) -> Any:
        from launcher.job.train import train_rank

        def stop() -> bool:  # elastic jobs: rank 0 asks after every step
            return ray.get(collector.stop_requested.remote())

        elastic = ctx.spec.devices.elastic
        outcome = train_rank(
            ctx, lambda snap: collector.push.remote(snap), stop if elastic else None
        )
        if outcome.stopped and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a resize: the next group is another
        return outcome


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def resolve_device(device: DeviceInfo | SimulatedDevice | None, index: int) -> DeviceInfo:
    """The device this process trains on: a simulated one, or this process's GPU (or CPU)."""
    if isinstance(device, SimulatedDevice):
        return device.info(index)
    if device is not None:
        return device
    found = [d for d in inventory() if d.torch_device is not None]
    return found[0]


def probe(
    spec: JobSpec,
    precision: Precision,
    device: DeviceInfo,
    cache_dir: str | None,
    *,
    measure: bool = True,
) -> ModelProfile | None:
    task = load_task(spec)
    torch.manual_seed(spec.seed)
    return profile_model(
        task,
        device,
        make_optimizer=build_optimizer(spec.optimizer),
        precision=precision,
        headroom_fraction=spec.memory_headroom,
        backend="nccl" if device.is_cuda else "gloo",  # as the runner picks
        max_micro_batch=search_cap(spec.global_batch_size),
        cache_dir=cache_dir,
        gradient_checkpointing=None,  # on where micro-batch 1 does not fit without it
        measure=measure,
    )
