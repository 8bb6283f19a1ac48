"""Regenerate benchmarks/RESULTS.md: run every benchmark, record the machine and the outputs.

    .venv/bin/python benchmarks/make_results.py [--only bench_hetero bench_simulate]

Runs the benchmarks that exist, one after the other (about 50 minutes in all on
2 cores), and writes RESULTS.md: the date, the machine (`uname -a`, CPU model,
cores, memory), the Python, torch and Ray versions, the git commit, a summary of
the headline lines, then per benchmark its command, exit status, wall time and
output. With --only, the listed benchmarks run again and the others' sections
are kept as they were. The GPU section (written by gpu_check.py on a GPU) is
always kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
GPU_BEGIN, GPU_END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
NO_GPU = "Not run yet: no GPU lent. Command: `bash benchmarks/gpu_run.sh`."
# (script, arguments, timeout s, the output lines copied into the summary), in running order
BENCHMARKS = (
    ("bench_planner.py", (), 300, r"devices="),
    ("bench_probe.py", (), 900, r"/ ours:"),
    ("bench_metrics.py", (), 300, r"metrics render"),
    ("bench_launch.py", (), 600, r"start-up|per-step time"),
    ("bench_hetero.py", (), 900, r"RESULT|efficiency a/c|sync wait / step|goals|where the gap"),
    ("bench_simulate.py", (), 600, r"estimates in|efficiency min"),
    ("bench_daemon.py", (), 900, r"GET|p50"),
    ("bench_lengths.py", (), 600, r"RESULT|padding waste"),
    ("bench_dataloader.py", (), 300, r"RESULT"),
    ("bench_sharding.py", (), 2400, r"RESULT|goals"),
    ("bench_elastic.py", (), 1500, r"RESULT|goals"),
    ("bench_rebalance.py", (), 1800, r"RESULT"),
    ("bench_checkpoint.py", (), 1200, r"RESULT|goals"),
)
HEADLINES = {script.removesuffix(".py"): re.compile(pattern) for script, *_, pattern in BENCHMARKS}


@dataclass(frozen=True)
class Outcome:
    name: str
    started: str
    command: str
    returncode: int
    seconds: float
    output: str


def _run(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def machine() -> list[str]:
    cpu = "?"
    if pathlib.Path("/proc/cpuinfo").exists():
        names = re.findall(r"model name\s*:\s*(.*)", pathlib.Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else "?"
    mem = "?"
    if pathlib.Path("/proc/meminfo").exists():
        kib = int(re.search(r"MemTotal:\s*(\d+)", pathlib.Path("/proc/meminfo").read_text())[1])
        mem = f"{kib / 2**20:.1f} GiB"
    versions = _run(
        [sys.executable, "-c", "import torch, ray; print(torch.__version__, ray.__version__)"]
    ).split()
    commit = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain"])
    return [
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: `{_run(['uname', '-a'])}`",
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem}; no GPU unless stated",
        f"- Python {platform.python_version()}, torch {versions[0] if versions else '?'}, "
        f"Ray {versions[1] if len(versions) > 1 else '?'}",
        f"- git: {commit}{' (with uncommitted changes)' if dirty else ''}",
    ]


def run_benchmark(script: str, args: tuple[str, ...], timeout_s: int) -> Outcome:
    command = [sys.executable, f"benchmarks/{script}", *args]
    shown = " ".join([".venv/bin/python", *command[1:]])
    print(f"running {shown} ...", flush=True)
    started = f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = -1, _text(exc.stdout), f"timed out after {timeout_s} s"
    seconds = time.monotonic() - t0
    if code != 0:  # the stderr tail explains the failure
        out += "\n[stderr, last lines]\n" + "\n".join(err.strip().splitlines()[-15:])
    print(f"  exit {code} in {seconds:.0f} s", flush=True)
    return Outcome(script, started, shown, code, seconds, out.strip())


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def section(o: Outcome) -> str:
    status = "ok" if o.returncode == 0 else f"FAILED (exit {o.returncode})"
    return "\n".join(
        [
            f"<!-- bench:{o.name}:begin -->",
            f"### {o.name}",
            "",
            f"`{o.command}` — {status}, {o.seconds:.0f} s, started {o.started}",
            "",
            "```text",
            o.output,
            "```",
            f"<!-- bench:{o.name}:end -->",
        ]
    )


def kept_sections(text: str) -> dict[str, str]:
    """The benchmark sections of an existing RESULTS.md, by script name."""
    pattern = r"(<!-- bench:(\S+):begin -->.*?<!-- bench:\2:end -->)"
    return {m[2]: m[1] for m in re.finditer(pattern, text, flags=re.S)}


def gpu_section(text: str) -> str:
    if GPU_BEGIN in text and GPU_END in text:
        return GPU_BEGIN + text.split(GPU_BEGIN, 1)[1].split(GPU_END, 1)[0] + GPU_END
    return f"{GPU_BEGIN}\n{NO_GPU}\n{GPU_END}"


def summary(sections: dict[str, str]) -> list[str]:
    lines = []
    for name, text in sections.items():
        body = text.split("```text", 1)[-1].split("```", 1)[0]
        wanted = HEADLINES[name.removesuffix(".py")]
        picked = [line.strip() for line in body.splitlines() if wanted.search(line)]
        if picked:
            lines += [f"- {name}:", *(f"  - {line}" for line in picked)]
    return lines


def render(sections: dict[str, str], gpu: str) -> str:
    parts = [
        "# Benchmark results",
        "",
        "Regenerated by `make bench` (`.venv/bin/python benchmarks/make_results.py`); the GPU "
        "section by `benchmarks/gpu_check.py` on a GPU. Absolute times are this machine's; "
        "compare ratios measured in the same run. How each benchmark measures is in its "
        "docstring (and, for bench_hetero, docs/measuring.md): on these 2-core machines the "
        "devices are simulated, and other processes "
        "on the machine disturb the timings (bench_hetero prints their CPU share per job).",
        "",
        "## Machine",
        "",
        *machine(),
        "",
        "## Summary",
        "",
        *summary(sections),
        "",
        "## GPU check",
        "",
        gpu,
        "",
        "## Benchmarks",
        "",
        "\n\n".join(sections.values()),
        "",
    ]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="benchmark names (e.g. bench_hetero) to rerun")
    args = parser.parse_args()
    text = RESULTS.read_text() if RESULTS.exists() else ""
    old = kept_sections(text)
    sections: dict[str, str] = {}
    failed = 0
    for script, extra, timeout_s, _ in BENCHMARKS:
        name = script.removesuffix(".py")
        if not (HERE / script).exists():
            continue
        if args.only and name not in args.only:
            if script in old:
                sections[script] = old[script]
            continue
        outcome = run_benchmark(script, extra, timeout_s)
        failed += outcome.returncode != 0
        sections[script] = section(outcome)
    RESULTS.write_text(render(sections, gpu_section(text)))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
