"""The library in any DDP script: probe and plan in the group, the plan sampler, the accumulator.

    python -m autobatch.tasks.example                              # one process
    AUTOBATCH_SIMULATED_DEVICES="sim-big:24MiB,sim-mid:12MiB:0.5,sim-small:6MiB:0.25" \\
        torchrun --nproc_per_node 3 -m autobatch.tasks.example     # three gloo ranks
    ... -m autobatch.tasks.example --sharding full                 # FSDP2, ZeRO-3
    ... -m autobatch.tasks.example --sharding proportional         # planned slices

Whatever the number of ranks and the sharding, every optimizer step sees the same
24 samples and the run's losses are the same (up to float rounding).
"""

import argparse
import os

import torch
import torch.distributed as dist

from autobatch import Accumulator, GlobalBatchSampler, plan_for_group, wrapping_for
from autobatch.tasks.tiny_gpt import tiny_gpt_task

parser = argparse.ArgumentParser()
modes = ["none", "optimizer", "full", "proportional", "auto"]
parser.add_argument("--sharding", default="none", choices=modes)
sharding = parser.parse_args().sharding
rank = int(os.environ.get("RANK", "0"))
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3)


task = tiny_gpt_task(dataset_size=512)
# Each rank measures its device (AUTOBATCH_SIMULATED_DEVICES declares simulated ones on a
# CPU-only machine), the ranks gather what they found, every rank gets the same plan.
plan = plan_for_group(task, 24, make_optimizer=make_optimizer, keep_all=True, sharding=sharding)
if rank == 0:
    print(plan.render_table())

torch.manual_seed(0)
model = task.build_model()
if plan.capacity(rank).gradient_checkpointing:
    task.checkpoint_activations(model)
# DDP, FSDP2 or the plan's proportional slices when the group has several ranks
wrapping = wrapping_for(plan.sharding, slices=plan.state_slices)
wrapped = wrapping.wrap(model, torch.device("cpu"))  # before the optimizer: it shards
acc = Accumulator(wrapped, make_optimizer(wrapped), max_grad_norm=1.0, wrapping=wrapping)
sampler = GlobalBatchSampler(len(task.dataset), plan.global_batch_size, seed=0)

for step in range(30):
    micro_batches = [task.batch(idx) for idx in sampler.micro_batches(plan, rank)]
    n_items = task.count_items(sampler.global_batch())  # target tokens of the global batch
    result = acc.step(micro_batches, task.loss_fn, global_items=n_items)
    sampler.advance()
    if rank == 0 and step % 10 == 9:
        print(f"step {step + 1}: loss {result.loss:.4f}")

if dist.is_initialized():
    dist.destroy_process_group()
