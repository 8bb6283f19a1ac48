"""The README's library example runs as written, alone and under torchrun (replicated,
fully sharded and in planned slices), with the same losses."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from distributed import free_port

from autobatch.probe.group import SIMULATED_ENV

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _loss_lines(cmd: list[str]) -> list[str]:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if line.startswith("step ")]


@pytest.fixture(scope="module")
def one() -> list[str]:
    """The example alone, in one process: what every torchrun run below must print."""
    return _loss_lines([sys.executable, "-m", "autobatch.tasks.example"])


@pytest.mark.parametrize("sharding", ["none", "full", "proportional"])
def test_example_gives_the_same_losses_on_one_and_three_ranks(one, sharding):
    three = _loss_lines(
        [
            "env",
            f"{SIMULATED_ENV}=sim-big:24MiB,sim-mid:12MiB:0.5,sim-small:6MiB:0.25",
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "3",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "autobatch.tasks.example",
            "--sharding",
            sharding,
        ]
    )
    assert len(one) == 3
    assert one == three
    first, last = (float(line.split()[-1]) for line in (one[0], one[-1]))
    assert last < first  # it trains
