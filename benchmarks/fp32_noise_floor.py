"""float32's own noise floor for the benchmarks' parameter comparisons.

    .venv/bin/python benchmarks/fp32_noise_floor.py [--layers 11 22 33]
    .venv/bin/python benchmarks/fp32_noise_floor.py --elastic

The same 6 AdamW steps (lr 0.002, clipping at 1.0) of bench_sharding's tiny GPT with
n layers, global batch 32, in one process: the global batch as 1 micro-batch against 2
and 4. The mathematics is identical; only float32's summation order differs. Printed:
the largest per-tensor ||a - b|| / ||b||, the measure bench_sharding holds to 1e-5.

--elastic: bench_elastic's long job (its model, global batch 48, seed 3) for 1000 AdamW
steps (no weight decay, as its spec) at lr 3e-3 and 3e-4, 1 vs 2 micro-batches; printed
at steps 100, 300 and 1000 with bench_elastic's measure (per tensor, max |a - b| /
max |b|). Over many steps a training run can amplify float32's rounding until the runs
part (lr 3e-3 here), and no split of the batch can then be compared to 1e-5;
bench_elastic trains at 3e-4.
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
    return run(dict(MODEL, n_layers=layers), GLOBAL_BATCH, 0, 0.002, parts, [STEPS])[STEPS]


def run(
    model: dict, global_batch: int, seed: int, lr: float, parts: int, at: list[int], wd=0.01
) -> dict[int, dict[str, torch.Tensor]]:
    """AdamW (weight decay `wd`, clipping at 1.0) for max(at) steps, the global batch as
    `parts` micro-batches; the parameters after each step in `at`."""
    task = tiny_gpt_task(**model, seed=seed)
    torch.manual_seed(seed)
    net = task.build_model()
    adamw = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    acc = Accumulator(net, adamw, max_grad_norm=1.0)
    sampler = GlobalBatchSampler(len(task.dataset), global_batch, seed=seed)
    size, out = global_batch // parts, {}
    for step in range(1, max(at) + 1):
        idx = sampler.global_batch().tolist()
        batches = [task.batch(idx[i : i + size]) for i in range(0, global_batch, size)]
        acc.step(batches, task.loss_fn, global_items=task.count_items(idx))
        sampler.advance()
        if step in at:
            out[step] = {k: v.detach().clone() for k, v in net.named_parameters()}
    return out


def elastic() -> None:
    from bench_elastic import GLOBAL_BATCH as BATCH
    from bench_elastic import MODEL as ELASTIC

    at = [100, 300, 1000]
    for lr in (3e-3, 3e-4):
        one, two = (run(ELASTIC, BATCH, 3, lr, parts, at, wd=0.0) for parts in (1, 2))
        for step in at:
            a, b = one[step], two[step]
            rel = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)
            print(f"lr {lr:g}, step {step}: 1 vs 2 micro-batches, {rel:.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[11, 22, 33])
    parser.add_argument("--elastic", action="store_true", help="bench_elastic's long job")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.elastic:
        return elastic()
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
