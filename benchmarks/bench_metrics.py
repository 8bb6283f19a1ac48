"""Render time of /metrics with the daemon's target load: 1,024 ranks of snapshots.

    python benchmarks/bench_metrics.py [--ranks 1024] [--repeats 15]

Prints one line: the median of several `PrometheusSink.render()` calls (the
path /metrics uses), and for comparison prometheus_client's `generate_latest`
over the same collector.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from prometheus_client import generate_latest

from autobatch.metrics.prometheus import PrometheusSink
from autobatch.metrics.snapshot import RankSnapshot

RANKS_PER_JOB = 128  # 8 jobs of 128 ranks for 1,024 ranks


def snapshot(i: int) -> RankSnapshot:
    """A fully populated snapshot, so every family has one series per rank."""
    return RankSnapshot(
        job=f"finetune-{i // RANKS_PER_JOB}",
        rank=i % RANKS_PER_JOB,
        node=f"node-{i // 8:03d}",
        device="NVIDIA A100-SXM4-80GB" if i % 3 else "Tesla T4",
        device_uuid=f"GPU-{i:08x}-1c2d-3e4f-5a6b-7c8d9e0f1a2b",
        device_memory_total_bytes=80 * 2**30,
        device_memory_used_bytes=61 * 2**30 + i,
        torch_memory_allocated_bytes=42 * 2**30 + i,
        torch_memory_reserved_bytes=58 * 2**30,
        torch_memory_peak_bytes=57 * 2**30 + 3 * i,
        plan_predicted_peak_bytes=56 * 2**30,
        micro_batch_size=16,
        accumulation_steps=4,
        rank_samples_per_step=64,
        global_batch_size=65536,
        effective_global_batch_size=65536,
        plan_efficiency_ratio=0.94,
        step_duration_s=1.37,
        sync_wait_s=0.21,
        train_loss=2.345 - i * 1e-6,
        step_durations_s=(1.31, 1.37, 1.42, 0.98),
        samples_processed_total=6_400_000,
        tokens_processed_total=13_107_200_000,
        optimizer_steps_total=100_000,
        oom_events_total=2,
        worker_restarts_total=1,
        replans_total={"oom": 2, "device_lost": 1},
    )


def median_ms(fn: Callable[[], bytes], repeats: int) -> tuple[float, int]:
    size = len(fn())  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    sink = PrometheusSink()
    for i in range(args.ranks):
        sink.push(snapshot(i))
    sink.set_job_states({"running": -(-args.ranks // RANKS_PER_JOB), "finished": 3})
    render_ms, size = median_ms(sink.render, args.repeats)
    lines = sink.render().count(b"\n")
    generic_ms, _ = median_ms(lambda: generate_latest(sink.registry), max(3, args.repeats // 3))
    print(
        f"metrics render, {args.ranks} ranks: median {render_ms:.1f} ms over {args.repeats} "
        f"renders ({lines} lines, {size / 1e6:.1f} MB); generate_latest on the same "
        f"collector {generic_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
