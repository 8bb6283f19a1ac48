"""The library in any DDP script: one plan, the plan sampler, the accumulator.

    python -m autobatch.tasks.example                              # one process
    torchrun --nproc_per_node 3 -m autobatch.tasks.example         # three gloo ranks

Whatever the number of ranks, every optimizer step sees the same 24 samples and
the run's losses are the same (up to float rounding).
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch import Accumulator, DeviceCapacity, GlobalBatchSampler, make_plan
from autobatch.tasks.tiny_gpt import tiny_gpt_task

world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")

# What each rank's device can do: largest micro-batch, seconds per micro-step.
# (In the launcher these come from the probe; here rank r is a smaller device.)
devices = [DeviceCapacity(f"cpu{r}", "cpu", 8 // (r + 1), 0.002, 0.001) for r in range(world)]
plan = make_plan(24, devices)
if rank == 0:
    print(plan.render_table())

task = tiny_gpt_task(dataset_size=512)
torch.manual_seed(0)
model = task.build_model()
ddp = DDP(model) if world > 1 else model
acc = Accumulator(ddp, torch.optim.AdamW(ddp.parameters(), lr=3e-3), max_grad_norm=1.0)
sampler = GlobalBatchSampler(len(task.dataset), plan.global_batch_size, seed=0)

for step in range(30):
    micro_batches = [task.batch(idx) for idx in sampler.micro_batches(plan, rank)]
    n_items = task.count_items(sampler.global_batch())  # target tokens of the global batch
    result = acc.step(micro_batches, task.loss_fn, global_items=n_items)
    sampler.advance()
    if rank == 0 and step % 10 == 9:
        print(f"step {step + 1}: loss {result.loss:.4f}")

if world > 1:
    dist.destroy_process_group()
