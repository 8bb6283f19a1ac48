"""float32's own noise floor for bench_sharding's parameter comparison.

    .venv/bin/python benchmarks/fp32_noise_floor.py [--layers 11 22 33]

The same 6 AdamW steps (lr 0.002, clipping at 1.0) of bench_sharding's tiny GPT with
n layers, global batch 32, in one process: the global batch as 1 micro-batch against 2
and 4. The mathematics is identical; only float32's summation order differs. Printed:
the largest per-tensor ||a - b|| / ||b||, the measure bench_sharding holds to 1e-5.
"""

from __future__ import annotations

import argparse

import torch

from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.tiny_gpt import tiny_gpt_task

MODEL = {"dataset_size": 2048, "vocab_size": 64, "seq_len": 16, "d_model": 64, "n_heads": 4}
GLOBAL_BATCH, STEPS = 32, 6


def train(layers: int, parts: int) -> dict[str, torch.Tensor]:
    task = tiny_gpt_task(**MODEL, n_layers=layers, seed=0)
    torch.manual_seed(0)
    model = task.build_model()
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=0.002), max_grad_norm=1.0)
    sampler = GlobalBatchSampler(len(task.dataset), GLOBAL_BATCH, seed=0)
    size = GLOBAL_BATCH // parts
    for _ in range(STEPS):
        idx = sampler.global_batch().tolist()
        batches = [task.batch(idx[i : i + size]) for i in range(0, GLOBAL_BATCH, size)]
        acc.step(batches, task.loss_fn, global_items=task.count_items(idx))
        sampler.advance()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[11, 22, 33])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for layers in args.layers:
        whole = train(layers, 1)
        for parts in (2, 4):
            split = train(layers, parts)
            rel = max(((split[k] - v).norm() / v.norm()).item() for k, v in whole.items())
            print(
                f"{layers} layers: 1 vs {parts} micro-batches, largest per-tensor relative "
                f"difference {rel:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
