"""The audit ledger tells runs apart: each line names its run (one JobController run) and
the attempt within it, and a step is judged by its last try, the newest run's highest
attempt. Runs on one checkpoint directory (a resubmit, a re-queue after the daemon's
supervisor died) append to the same files; judged by attempt alone, an exact job read
as inexact.

One reader serves both: benchmarks/ledger.py (what benchmarks report), which the tests'
`assert_every_global_batch_exact` (tests/test_launcher.py) reads through.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import yaml
from daemon_util import TINY, tiny_spec
from test_launcher import assert_every_global_batch_exact

from autobatch.planning.sampler import GlobalBatchSampler
from launcher.cli import main
from launcher.job.context import new_run_id

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from ledger import exact_global_batches  # noqa: E402 (benchmarks/ledger.py)

N, B, SEED, STEPS = TINY["dataset_size"], 24, 1, 3
SAMPLER = GlobalBatchSampler(N, B, seed=SEED)
OLD, NEW = "20261201T090000.000000Z-aaaa", "20261201T100000.000000Z-bbbb"


def halves(step: int) -> list[list[int]]:
    batch = SAMPLER.global_batch(step).tolist()
    return [batch[: B // 2], batch[B // 2 :]]


def line(rank_share: list[int], step: int, attempt: int, run: str | None) -> dict:
    e = {"attempt": attempt, "step": step, "micro_batches": [rank_share]}
    return e if run is None else {"run": run, **e}


def write_ledger(d: pathlib.Path, lines_by_rank: dict[int, list[dict]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for rank, lines in lines_by_rank.items():
        (d / f"samples-rank{rank}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def two_ranks(run: str | None, steps: range, attempt: int = 0) -> dict[int, list[dict]]:
    return {r: [line(halves(s)[r], s, attempt, run) for s in steps] for r in (0, 1)}


def one_rank(run: str | None, steps: range, attempt: int = 0) -> dict[int, list[dict]]:
    return {0: [line(SAMPLER.global_batch(s).tolist(), s, attempt, run) for s in steps]}


def merged(*runs: dict[int, list[dict]]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for lines_by_rank in runs:  # appended in the order the runs ran
        for rank, lines in lines_by_rank.items():
            out.setdefault(rank, []).extend(lines)
    return out


def restarted_then_cut(run: str) -> dict[int, list[dict]]:
    """Two ranks; restarted at step 2 (attempt 1); cancelled during step 2's second try:
    only rank 0 wrote its line of it."""
    lines = two_ranks(run, range(0, 3))
    lines[0].append(line(halves(2)[0], 2, 1, run))
    return lines


@pytest.mark.parametrize(
    "lines_by_rank, exact",
    [
        # one run
        (two_ranks(NEW, range(STEPS)), True),
        # a resubmit from scratch on one device: the newest run's lines count, not a mix
        (merged(two_ranks(OLD, range(STEPS)), one_rank(NEW, range(STEPS))), True),
        # a resubmit resumed at step 2 after a run whose restart was cut short: step 2's last
        # try is the new run's attempt 0, not the old run's half-written attempt 1
        (merged(restarted_then_cut(OLD), one_rank(NEW, range(2, STEPS))), True),
        # a ledger from before runs were named, then a named run: the named one is newer
        (merged(two_ranks(None, range(STEPS)), one_rank(NEW, range(STEPS))), True),
        # the newest run's step 1 lacks a sample: inexact, whatever older runs hold
        (
            merged(
                two_ranks(OLD, range(STEPS)),
                {
                    0: [
                        line(SAMPLER.global_batch(s).tolist()[: B - (s == 1)], s, 0, NEW)
                        for s in range(STEPS)
                    ]
                },
            ),
            False,
        ),  # fmt: skip
        # the newest run's attempt 1 re-did step 2 on rank 0 only: half a batch
        (merged(two_ranks(NEW, range(STEPS)), {0: [line(halves(2)[0], 2, 1, NEW)]}), False),
    ],
)
def test_a_step_is_judged_by_the_newest_runs_last_attempt(tmp_path, lines_by_rank, exact):
    write_ledger(tmp_path, lines_by_rank)
    assert exact_global_batches(tmp_path, N, B, SEED, STEPS) is exact
    spec = {"global_batch_size": B, "seed": SEED, "max_steps": STEPS}
    if exact:
        assert_every_global_batch_exact(spec, tmp_path)
    else:
        with pytest.raises(AssertionError):
            assert_every_global_batch_exact(spec, tmp_path)


def test_run_ids_are_new_per_run_and_sort_as_the_runs_began():
    ids = [new_run_id() for _ in range(50)]
    assert len(set(ids)) == 50 and sorted(ids) == ids


# -- through `autobatch run`: a resubmit to the same checkpoint directory -------------------


def test_a_resubmit_to_the_same_checkpoint_directory_is_judged_exact(local_ray, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    for sims, resume in [(("big", "mid"), True), (("big",), False)]:  # then over, on one device
        spec = tiny_spec(
            "again",
            sims=sims,
            max_steps=STEPS,
            audit_samples=True,
            checkpoint={"dir": str(ckpt), "interval": 2, "resume": resume},
        )
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(spec))
        assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
        assert capsys.readouterr().out.count("done: 3 steps") == 1
    lines = [json.loads(x) for p in ckpt.glob("samples-rank*.jsonl") for x in p.open()]
    runs = sorted({e["run"] for e in lines})
    assert len(runs) == 2 and {e["attempt"] for e in lines} == {0}  # attempts count per run
    assert {e["run"] for e in lines if e["step"] == 0} == set(runs)  # both ran step 0
    assert exact_global_batches(ckpt, N, B, SEED, STEPS)
    assert_every_global_batch_exact(
        {"global_batch_size": B, "seed": SEED, "max_steps": STEPS}, ckpt
    )
