"""Planning time for fleets of 10, 1,000 and 10,000 devices (goal: < 1 s for 10,000).

    python benchmarks/bench_planner.py

Devices are drawn from a seeded mix of GPU-like capacities (micro-batch limits
1..512, fixed and per-sample costs spanning 10x). One line per size: the median
of 5 plans, and the plan's predicted efficiency and speedup over the equal split.
"""

from __future__ import annotations

import random
import statistics
import time

from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan


def fleet(n: int, seed: int = 0) -> list[DeviceCapacity]:
    rng = random.Random(seed)
    return [
        DeviceCapacity(
            device_id=f"gpu{i}",
            name=rng.choice(["A100-80GB", "L4-24GB", "T4-16GB", "H100-80GB"]),
            max_micro_batch=rng.randint(1, 512),
            fixed_s=rng.uniform(1e-3, 1e-2),
            per_sample_s=rng.uniform(1e-4, 1e-3),
            step_overhead_s=rng.uniform(0.0, 5e-3),
        )
        for i in range(n)
    ]


def main() -> None:
    for n, B in [(10, 1024), (10, 1_048_576), (1_000, 1_048_576), (10_000, 1_048_576)]:
        devices = fleet(n)
        times, plan = [], None
        for _ in range(5):
            t0 = time.perf_counter()
            plan = make_plan(B, devices)
            times.append(time.perf_counter() - t0)
        print(
            f"devices={n:>6}  global_batch={B:>9,}  "
            f"plan time median {statistics.median(times):.3f} s"
            f" (min {min(times):.3f})  ranks={plan.world_size}  efficiency={plan.efficiency:.3f}"
            f"  speedup_vs_equal_split={plan.speedup_vs_baseline:.2f}x"
        )


if __name__ == "__main__":
    main()
