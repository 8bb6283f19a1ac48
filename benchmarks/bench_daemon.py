"""The daemon's API under load, driven from another process: 50 concurrent clients against
`autobatch serve --api-only` holding 1,000 jobs (goal: p99 < 50 ms); and the time to scrape
/metrics holding snapshots of 1,024 ranks (goal < 100 ms).

The server is a subprocess (its own interpreter and GIL: clients inside the server's
process would measure the GIL, not the server). The clients are asyncio connections
in this process, each on its own kept-alive connection, writing requests by hand
(httpx costs more CPU per request than the server: it would measure itself). Jobs are
queued, not run: no Ray. Phases, each `REQUESTS` requests from `CLIENTS` clients:

    list     GET /v1/jobs                 the first page (100 jobs, the default)
    job      GET /v1/jobs/{id}            a random job's record with its transitions
    mixed    90% job, 9% list, 1% POST /v1/jobs (a new spec: parsed, validated, stored)
    paced    mixed, each client sending at most PACED_RATE requests/s (an open loop:
             what users polling the daemon see, not what a saturated server does)

Closed loops (every client sends its next request when the last one is answered)
measure the server saturated: by Little's law, latency = clients / throughput. On a
2-core machine the clients and the server share the cores: the CPU each spends per
request is printed, so the throughput a free core would give can be read off.

The /metrics scrape needs 1,024 ranks in the daemon's sink, which only code inside
the daemon's process can push: that part serves the app in this process (one client,
sequential requests).

    .venv/bin/python benchmarks/bench_daemon.py [--clients 50] [--jobs 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from daemon_util import api_in_thread, tiny_spec  # noqa: E402

CLIENTS, JOBS, REQUESTS, RANKS, PACED_RATE = 50, 1000, 5000, 1024, 10.0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


class Connection:
    """One kept-alive HTTP/1.1 connection; requests written by hand, answers read whole."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        headers = await self.reader.readuntil(b"\r\n\r\n")
        status = int(headers.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in headers.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux; 0 elsewhere)."""
    stat = pathlib.Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return 0.0
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(
    url: str, pick, requests: int, clients: int, rate: float | None = None, pid: int = 0
) -> dict:
    """`requests` requests from `clients` connections; `pick()` gives (method, path, body,
    kind). Latencies per kind, wall time, statuses, and the server's CPU time (`pid`)."""
    host, port = url.removeprefix("http://").split(":")
    conns = [await Connection.open(host, int(port)) for _ in range(clients)]
    latencies: dict[str, list[float]] = {}
    statuses: dict[int, int] = {}
    left = [requests]

    async def client(conn: Connection) -> None:
        await asyncio.sleep(random.random() / rate if rate else 0)  # spread the starts
        while left[0] > 0:
            left[0] -= 1
            method, path, body, kind = pick()
            t0 = time.perf_counter()
            status, _ = await conn.request(method, path, body)
            took = time.perf_counter() - t0
            latencies.setdefault(kind, []).append(took)
            statuses[status] = statuses.get(status, 0) + 1
            if rate:
                await asyncio.sleep(max(0.0, 1 / rate - took))

    t0, cpu0, mine0 = time.perf_counter(), cpu_seconds(pid), time.process_time()
    await asyncio.gather(*(client(c) for c in conns))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    mine = time.process_time() - mine0
    for c in conns:
        c.close()
    every = [x for v in latencies.values() for x in v]
    return {
        "latencies": latencies, "all": every, "wall": wall, "cpu": cpu, "client_cpu": mine,
        "statuses": statuses,
    }  # fmt: skip


def report(name: str, result: dict, clients: int) -> None:
    ms = [x * 1000 for x in result["all"]]
    rps = len(ms) / result["wall"]
    server, mine = (result[k] / len(ms) * 1000 for k in ("cpu", "client_cpu"))
    print(
        f"{name:<7} {clients} clients: p50 {pct(ms, 50):6.1f} ms  p99 {pct(ms, 99):6.1f} ms  "
        f"max {max(ms):6.1f} ms  {rps:5.0f} requests/s  CPU per request: server "
        f"{server:.2f} ms, clients {mine:.2f} ms  statuses {result['statuses']}"
    )
    if len(result["latencies"]) > 1:
        for kind, values in sorted(result["latencies"].items()):
            v = [x * 1000 for x in values]
            print(f"          {kind:<5} n={len(v):<5} median {pct(v, 50):6.1f} ms  "
                  f"99th {pct(v, 99):6.1f} ms")  # fmt: skip


def start_server(state: pathlib.Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("AUTOBATCH_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "serve", "--api-only", "--port", "0",
         "--state-dir", str(state)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE,
    )  # fmt: skip
    line = proc.stdout.readline().decode()
    assert "daemon on http://" in line, line
    return proc, line.split(" on ")[1].split()[0]


def fill(url: str, jobs: int) -> tuple[list[str], float]:
    """Submit `jobs` specs through the API (8 at a time); their ids and the p99 of a submit."""
    took: list[float] = []

    async def go() -> list[str]:
        ids: list[str] = []
        host, port = url.removeprefix("http://").split(":")
        conns = [await Connection.open(host, int(port)) for _ in range(8)]

        async def one(conn: Connection, n: int) -> None:
            for i in range(n, jobs, len(conns)):
                body = json.dumps(tiny_spec(f"job{i}")).encode()
                t0 = time.perf_counter()
                status, answer = await conn.request("POST", "/v1/jobs", body)
                took.append(time.perf_counter() - t0)
                assert status == 201, answer
                ids.append(json.loads(answer)["id"])

        await asyncio.gather(*(one(c, n) for n, c in enumerate(conns)))
        return ids

    return asyncio.run(go()), pct(took, 99) * 1000


def bench_api(clients: int, jobs: int, requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(pathlib.Path(tmp) / "state")
        try:
            for _ in range(100):
                try:
                    if httpx.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            t0 = time.perf_counter()
            ids, submit_p99 = fill(url, jobs)
            print(
                f"filled {jobs} jobs through POST /v1/jobs (8 clients) in "
                f"{time.perf_counter() - t0:.1f} s, submit p99 {submit_p99:.1f} ms"
            )
            spec = json.dumps(tiny_spec("bench")).encode()

            def listing():
                return "GET", "/v1/jobs", b"", "list"

            def one_job():
                return "GET", f"/v1/jobs/{random.choice(ids)}", b"", "job"

            def mixed():
                r = random.random()
                if r < 0.01:
                    return "POST", "/v1/jobs", spec, "post"
                return listing() if r < 0.10 else one_job()

            asyncio.run(drive(url, mixed, 500, clients))  # warm up
            for name, pick in (("list", listing), ("job", one_job), ("mixed", mixed)):
                report(
                    name, asyncio.run(drive(url, pick, requests, clients, pid=proc.pid)), clients
                )
            paced = asyncio.run(
                drive(url, mixed, requests // 2, clients, rate=PACED_RATE, pid=proc.pid)
            )
            report("paced", paced, clients)
            print(f"          (paced: each client at most {PACED_RATE:g} requests/s)")
        finally:
            proc.terminate()
            proc.wait(30)


def bench_metrics() -> None:
    from autobatch.metrics.snapshot import RankSnapshot
    from launcher.daemon.daemon import Daemon

    def snapshot(job: str, rank: int) -> RankSnapshot:
        return RankSnapshot(
            job, rank, f"10.0.{rank // 8}.1", "A100-SXM4-80GB", device_uuid=f"GPU-{rank:08d}",
            device_memory_total_bytes=80 << 30, device_memory_used_bytes=60 << 30,
            torch_memory_allocated_bytes=50 << 30, torch_memory_reserved_bytes=55 << 30,
            torch_memory_peak_bytes=58 << 30, plan_predicted_peak_bytes=57 << 30,
            micro_batch_size=16, accumulation_steps=4, rank_samples_per_step=64,
            global_batch_size=65536, effective_global_batch_size=65536,
            plan_efficiency_ratio=0.93, step_duration_s=1.2, sync_wait_s=0.05, train_loss=2.1,
            step_durations_s=(1.2, 1.1), samples_processed_total=6400,
            tokens_processed_total=6400 * 512, optimizer_steps_total=100,
            replans_total={"oom": 1},
        )  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(tmp, run_jobs=False)
        daemon.start()
        for r in range(RANKS):
            daemon.sink.push(snapshot(f"job-{r // 256}", r))
        with api_in_thread(daemon) as url, httpx.Client(base_url=url, timeout=60) as http:
            scrape = []
            for _ in range(30):
                t0 = time.perf_counter()
                body = http.get("/metrics").content
                scrape.append((time.perf_counter() - t0) * 1000)
        render = []
        for _ in range(30):
            t0 = time.perf_counter()
            daemon.sink.render()
            render.append((time.perf_counter() - t0) * 1000)
        daemon.shutdown()
    lines = body.count(b"\n")
    print(f"GET /metrics with {RANKS} ranks ({len(body) / 1e6:.1f} MB, {lines} lines):")
    print(
        f"  scrape p50 {statistics.median(scrape):.1f} ms  p99 {pct(scrape, 99):.1f} ms "
        f"(goal < 100 ms); render alone p50 {statistics.median(render):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--requests", type=int, default=REQUESTS)
    args = parser.parse_args()
    print(
        f"API from another process: {args.clients} concurrent clients, {args.jobs} jobs in "
        f"the store, {args.requests} requests per phase (goal: p99 < 50 ms); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    bench_api(args.clients, args.jobs, args.requests)
    bench_metrics()


if __name__ == "__main__":
    main()
