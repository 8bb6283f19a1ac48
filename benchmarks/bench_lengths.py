"""Length-aware packing vs fixed-size micro-batches, on the tiny causal LM.

    .venv/bin/python benchmarks/bench_lengths.py [--steps 4] [--rounds 2]

A tiny random GPT-2 (autobatch.tasks.lm_example.make_tiny_model_dir: 4 layers, d_model
128) trains on synthetic text with long-tailed (log-normal) lengths, truncated
to --max-len tokens, with the same global batch every step (--global-batch
sequences, the same sequences in every strategy). The device fits
--micro-batch sequences of the maximum length, so its token budget is
micro-batch x max-len padded tokens. Three ways to run each step:

  packed    autobatch.planning.packing: the step's sequences sorted by length and packed
            under the token budget (short sequences make large micro-batches)
  fixed     micro-batches of --micro-batch sequences in sampler order, each
            padded to its longest sequence (a DataLoader with dynamic padding)
  static    the same, padded to max-len (static shapes)

It prints samples/s and padding waste (padded tokens / all tokens) of each, the
ratios against `fixed`, and checks that all three give the same loss (the
token-exact loss does not depend on how a step is cut). One process, one
thread, fp32, AdamW; the rounds are interleaved and the median is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from autobatch.planning.packing import TokenBudget, pack_global_batch, padding_waste
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.causal_lm import causal_lm_task, collate
from autobatch.tasks.lm_example import make_example_jsonl, make_tiny_model_dir


def fixed_micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def time_model(task, micro_batch: int) -> TokenBudget:  # noqa: ANN001
    """Fixed and per-token cost of a micro-step at the maximum length (two sizes, each the
    minimum of 5 after a warm-up)."""
    model = task.build_model()
    times = {}
    task.loss_fn(model, task.probe_batch(micro_batch)).backward()  # warm-up
    for b in (1, micro_batch):
        batch = task.probe_batch(b)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            task.loss_fn(model, batch).backward()
            runs.append(time.perf_counter() - t0)
        times[b] = min(runs)
    per_sample = (times[micro_batch] - times[1]) / (micro_batch - 1)
    max_len = task.max_length()
    return TokenBudget(
        max_tokens=micro_batch * max_len,
        fixed_s=max(0.0, times[1] - per_sample),
        per_token_s=per_sample / max_len,
    )


def run(
    task,  # noqa: ANN001
    steps: list[list[int]],
    cut: Callable[[list[int]], list[list[int]]],
    pad_to: int | None,
) -> tuple[float, float, float]:
    """Trains `steps` global batches cut by `cut`: (samples/s, padding waste, first loss)."""
    torch.manual_seed(0)
    model = task.build_model()
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    pad_id = task.tokenizer.pad_token_id
    lengths_of = {i: task.sample_length(task.dataset[i]) for step in steps for i in step}
    padded = real = 0
    first_loss = None
    t0 = time.perf_counter()
    for indices in steps:
        micro = cut(indices)
        samples = [[task.dataset[i] for i in mb] for mb in micro]
        if pad_to is None:
            batches = [task.collate(s) for s in samples]
        else:  # static shapes: a dummy sequence of pad_to tokens, not a target, then dropped
            batches = [_collate_to(s, pad_to, pad_id) for s in samples]
        n = task.count_items(indices)
        result = acc.step(batches, task.loss_fn, global_items=n)
        first_loss = result.loss if first_loss is None else first_loss
        waste = padding_waste(micro, lengths_of)
        tokens = sum(lengths_of[i] for i in indices)
        real += tokens
        padded += tokens / (1 - waste) if pad_to is None else len(indices) * pad_to
    seconds = time.perf_counter() - t0
    return sum(map(len, steps)) / seconds, 1 - real / padded, first_loss


def _collate_to(samples: list[dict], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    filler = {
        "input_ids": torch.full((width,), pad_id),
        "labels": torch.full((width,), -100),
    }
    batch = collate([*samples, filler], pad_id)
    return {k: v[:-1] for k, v in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8, help="fits at max-len")
    parser.add_argument("--max-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:  # the task loads the model from here
        model_dir = make_tiny_model_dir(
            f"{tmp}/model", n_layers=4, d_model=128, n_heads=4, max_positions=args.max_len
        )
        data = make_example_jsonl(f"{tmp}/data.jsonl", 2000, kind="text", max_words=400)
        task = causal_lm_task(model_dir=str(model_dir), data=str(data), max_seq_len=args.max_len)
        compare(task, args)


def compare(task, args: argparse.Namespace) -> None:  # noqa: ANN001
    lengths = sorted(task.sample_length(s) for s in task.dataset)
    print(
        f"tiny GPT-2 (4 layers, d_model 128), {len(lengths)} sequences: length median "
        f"{lengths[len(lengths) // 2]}, p90 {lengths[int(len(lengths) * 0.9)]}, max "
        f"{lengths[-1]} (cut at {args.max_len}), {task.truncated_samples} truncated; global "
        f"batch {args.global_batch}, {args.micro_batch} x {args.max_len} tokens fit"
    )
    budget = time_model(task, args.micro_batch)
    print(
        f"time model at max length: {budget.fixed_s * 1e3:.1f} ms per micro-step + "
        f"{budget.per_token_s * 1e6:.1f} us per padded token"
    )
    sampler = GlobalBatchSampler(len(task.dataset), args.global_batch, seed=0)
    steps = []
    for _ in range(args.steps):
        steps.append([int(i) for i in sampler.global_batch()])
        sampler.advance()

    def packed(indices: list[int]) -> list[list[int]]:
        return pack_global_batch(indices, task.lengths(indices), [budget])[0]

    def fixed(indices: list[int]) -> list[list[int]]:
        return fixed_micro_batches(indices, args.micro_batch)

    ways = {"packed": (packed, None), "fixed": (fixed, None), "static": (fixed, args.max_len)}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in ways}
    for _ in range(args.rounds):
        for name, (cut, pad_to) in ways.items():
            results[name].append(run(task, steps, cut, pad_to))
    base = statistics.median(r[0] for r in results["fixed"])
    for name, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        print(
            f"  {name:<7} {rate:7.1f} samples/s ({rate / base:.2f}x fixed), padding waste "
            f"{runs[0][1]:.1%}, micro-steps/step {len(ways[name][0](steps[0]))}, "
            f"first-step loss {runs[0][2]:.6f}"
        )
    losses = [runs[0][2] for runs in results.values()]
    spread = (max(losses) - min(losses)) / min(losses)
    print(f"same loss whatever the cut: relative spread {spread:.1e} (fp32)")
    rate = statistics.median(r[0] for r in results["packed"])
    print(f"RESULT packed / fixed = {rate / base:.2f}x samples/s")


if __name__ == "__main__":
    main()
