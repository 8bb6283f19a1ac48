"""What the two GPU checks share: a bare checkout, a guarded set-up, results that survive.

The GPU machine has its own python3 with CUDA torch and numpy, not this project's
venv nor the installed package. Importing this module (first, before torch) puts
the repository on `sys.path`, drops an inherited `PYTORCH_CUDA_ALLOC_CONF` (the
checks measure the allocator's default behaviour) and pins gloo to the loopback
interface (`GLOO_SOCKET_IFNAME=lo`: every rank is on this machine).

A `Record` is one check's report as it is made: lines printed as they come, the
measurements as JSON, and a FAILED section naming every error with what was
measured before it. `save()` writes `$OUT/<check>.md` and `$OUT/<check>.json`
when the `OUT` environment variable is set (the device tool brings back only
what is under `$OUT`), and the check's part of the GPU section of
benchmarks/RESULTS.md (between its own markers, inside the gpu-check markers that
make_results.py keeps).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
COMMAND = "OUT=<dir> bash benchmarks/gpu_run.sh"
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _has_loopback() -> bool:
    try:
        return "lo" in {name for _, name in socket.if_nameindex()}
    except OSError:  # cannot list the interfaces: assume the usual
        return True


if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SETUP_NOTES = [  # what the guards changed, for the report
    f"ignored {k}={os.environ.pop(k)!r}: the checks measure the default allocator"
    for k in ALLOC_CONF_VARS
    if k in os.environ
]
if _has_loopback():
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
else:  # gloo would fail to find it: let it choose
    os.environ.pop("GLOO_SOCKET_IFNAME", None)
    SETUP_NOTES.append("no network interface 'lo': GLOO_SOCKET_IFNAME left unset")


class TimeLimit(BaseException):
    """The check's wall-clock limit (--time-limit, or SIGTERM from `timeout`) was reached."""


def raise_time_limit(signum: int, frame: object) -> None:
    """A SIGTERM handler: unwind, so that what was measured is still saved."""
    raise TimeLimit(f"stopped by signal {signum} (the wall-clock limit of gpu_run.sh?)")


def out_dir() -> pathlib.Path | None:
    """$OUT, created, or None when it is not set."""
    out = os.environ.get("OUT")
    if not out:
        return None
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def nvidia_smi() -> list[dict[str, str]]:
    """nvidia-smi's name and compute mode of each GPU ([] without nvidia-smi)."""
    fields = ("index", "name", "compute_mode", "memory.total", "driver_version")
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split(", ") for line in out.stdout.strip().splitlines()]
    return [dict(zip(fields, row)) for row in rows if len(row) == len(fields)]


def cuda_device_info(index: int = 0) -> Any:
    """A `DeviceInfo` of cuda:`index` from torch alone (NVML not needed); creates the context."""
    import torch

    from autobatch.probe.devices import DeviceInfo

    device = torch.device(f"cuda:{index}")
    free, total = torch.cuda.mem_get_info(device)
    props = torch.cuda.get_device_properties(device)
    return DeviceInfo(
        index=index,
        uuid=str(getattr(props, "uuid", f"GPU-{index}")),
        name=props.name,
        total_bytes=total,
        free_bytes=free,
        used_bytes=total - free,
        compute_capability=(props.major, props.minor),
        bf16_supported=torch.cuda.is_bf16_supported(),
        pci_bus_id=None,
        torch_device=str(device),
    )


def write_part(key: str, lines: list[str], results: pathlib.Path = RESULTS) -> None:
    """Replace this check's part of the GPU section of RESULTS.md (create either if missing)."""
    begin, end = f"<!-- gpu-check:{key}:begin -->", f"<!-- gpu-check:{key}:end -->"
    part = "\n".join([begin, *lines, end])
    text = results.read_text() if results.exists() else ""
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n## GPU check\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    section, tail = rest.split(END, 1)
    if begin in section and end in section:
        before, after = section.split(begin, 1)
        section = before + part + after.split(end, 1)[1]
    else:
        section = section.rstrip("\n") + "\n" + part + "\n"
    results.write_text(head + BEGIN + section + END + tail)


class Record:
    """One check's report: lines, measurements (JSON), failures; printed as they come."""

    def __init__(self, name: str, title: str) -> None:
        self.name, self.title = name, title
        self.t0 = time.time()
        self.lines: list[str] = []
        self.data: dict[str, Any] = {"check": name, "started": time.strftime("%Y-%m-%d %H:%M")}
        self.failures: list[str] = []
        for note in SETUP_NOTES:
            self.say(note)

    def say(self, text: str) -> None:
        """A progress line (printed, and kept in the JSON)."""
        line = f"[{self.name} +{time.time() - self.t0:5.1f} s] {text}"
        print(line, flush=True)
        self.data.setdefault("progress", []).append(line)

    def note(self, text: str) -> None:
        """A line of the report (printed now)."""
        self.lines.append(text)
        print(text, flush=True)

    def fail(self, text: str) -> None:
        self.failures.append(text)
        print(f"FAILED: {text}", file=sys.stderr, flush=True)

    def section(self) -> list[str]:
        lines = [f"### {self.title}", "", *self.lines]
        if self.failures:
            lines += [
                "",
                "**FAILED.** What was measured before the failure is above; the errors:",
                "",
                *(f"- {f}" for f in self.failures),
            ]
        return lines

    def save(self, *, results: bool) -> list[pathlib.Path]:
        """$OUT/<name>.md and .json when OUT is set; RESULTS.md's part when `results`."""
        written = []
        self.data.update(
            lines=self.lines,
            failures=self.failures,
            seconds=round(time.time() - self.t0, 1),
        )
        out = out_dir()
        if out is not None:
            md, js = out / f"{self.name}.md", out / f"{self.name}.json"
            md.write_text("\n".join(self.section()) + "\n")
            _atomic_write(js, json.dumps(self.data, indent=1, default=str))
            written += [md, js]
        if results:
            write_part(self.name, self.section())
            written.append(RESULTS)
        return written


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: pathlib.Path | str, data: Any) -> None:
    """Readers (the parent, while ranks run) never see half a file."""
    _atomic_write(pathlib.Path(path), json.dumps(data, default=str))


def error_line(exc: BaseException) -> str:
    """An error as one line: its type and the first line of its message (as a code span:
    a message is text from outside, not markup)."""
    first = (str(exc).strip().splitlines() or [""])[0][:500].replace("`", "'")
    return f"{type(exc).__name__}: `{first}`"
