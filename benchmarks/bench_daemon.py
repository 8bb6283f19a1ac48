"""The daemon's API under load: list-jobs latency with 50 concurrent clients, and the time to
scrape /metrics holding snapshots of 1,024 ranks (goal < 100 ms).

A real daemon (SQLite store, uvicorn on a loopback port, in this process's threads;
jobs are queued, not run, so Ray is not needed) holding 200 queued jobs.

    .venv/bin/python benchmarks/bench_daemon.py
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import tempfile
import threading
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from daemon_util import api_in_thread, tiny_spec  # noqa: E402

from autobatch.metrics.snapshot import RankSnapshot  # noqa: E402
from launcher.daemon.daemon import Daemon  # noqa: E402

CLIENTS, REQUESTS_EACH, JOBS, RANKS = 50, 20, 200, 1024


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def snapshot(job: str, rank: int) -> RankSnapshot:
    return RankSnapshot(
        job, rank, f"10.0.{rank // 8}.1", "A100-SXM4-80GB", device_uuid=f"GPU-{rank:08d}",
        device_memory_total_bytes=80 << 30, device_memory_used_bytes=60 << 30,
        torch_memory_allocated_bytes=50 << 30, torch_memory_reserved_bytes=55 << 30,
        torch_memory_peak_bytes=58 << 30, plan_predicted_peak_bytes=57 << 30,
        micro_batch_size=16, accumulation_steps=4, rank_samples_per_step=64,
        global_batch_size=65536, effective_global_batch_size=65536, plan_efficiency_ratio=0.93,
        step_duration_s=1.2, sync_wait_s=0.05, train_loss=2.1, step_durations_s=(1.2, 1.1),
        samples_processed_total=6400, tokens_processed_total=6400 * 512,
        optimizer_steps_total=100, replans_total={"oom": 1},
    )  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(tmp, run_jobs=False)
        daemon.start()
        for i in range(JOBS):
            daemon.submit(tiny_spec(f"job{i}"))
        for r in range(RANKS):
            daemon.sink.push(snapshot(f"job-{r // 256}", r))
        with api_in_thread(daemon) as url:
            latencies: list[float] = []
            lock = threading.Lock()

            def client() -> None:
                mine = []
                with httpx.Client(base_url=url, timeout=60) as http:
                    for _ in range(REQUESTS_EACH):
                        t0 = time.perf_counter()
                        r = http.get("/v1/jobs")
                        mine.append(time.perf_counter() - t0)
                        assert r.status_code == 200 and len(r.json()) == JOBS
                with lock:
                    latencies.extend(mine)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            ms = [x * 1000 for x in latencies]
            print(f"GET /v1/jobs ({JOBS} jobs), {CLIENTS} concurrent clients x {REQUESTS_EACH}:")
            print(f"  p50 {pct(ms, 50):.1f} ms  p99 {pct(ms, 99):.1f} ms  "
                  f"{len(ms) / wall:.0f} requests/s")  # fmt: skip

            scrape = []
            with httpx.Client(base_url=url, timeout=60) as http:
                for _ in range(30):
                    t0 = time.perf_counter()
                    body = http.get("/metrics").content
                    scrape.append((time.perf_counter() - t0) * 1000)
            render = []
            for _ in range(30):
                t0 = time.perf_counter()
                daemon.sink.render()
                render.append((time.perf_counter() - t0) * 1000)
            lines = body.count(b"\n")
            print(f"GET /metrics with {RANKS} ranks ({len(body) / 1e6:.1f} MB, {lines} lines):")
            print(f"  scrape p50 {pct(scrape, 50):.1f} ms  p99 {pct(scrape, 99):.1f} ms "
                  f"(goal < 100 ms); render alone p50 {pct(render, 50):.1f} ms")  # fmt: skip
        daemon.shutdown()


if __name__ == "__main__":
    main()
