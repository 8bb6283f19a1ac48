"""The memory levers: their names defined once, read by every layer; a bad name refused with
the field, the value and the choices; each lever one term of the memory model."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from typing import get_args

import pytest

from autobatch import levers
from autobatch.errors import PlanError
from autobatch.levers import (
    SHARD_MODES,
    SHARDING_CHOICES,
    SHARDINGS,
    check_shard_mode,
    check_sharding,
    check_sharding_choice,
)
from autobatch.planning import memory
from autobatch.planning.memory import SHARDING_TERMS, ModelState, Term, sharding_term


@pytest.mark.parametrize(
    "check, value, message",
    [
        # a mode no layer knows
        (
            check_sharding,
            "zero2",
            "sharding='zero2' must be one of 'none', 'optimizer', 'full', 'proportional'",
        ),
        # "none" is no mode of the sharded wrapping
        (check_shard_mode, "none", "mode='none' must be one of 'optimizer', 'full'"),
        # a user's choice may be "auto"; names are case-sensitive
        (
            check_sharding_choice,
            "Auto",
            "sharding='Auto' must be one of 'none', 'optimizer', 'full', 'proportional', 'auto'",
        ),
        # not text at all
        (
            check_sharding,
            3,
            "sharding=3 must be one of 'none', 'optimizer', 'full', 'proportional'",
        ),
    ],
)
def test_a_bad_name_is_refused_naming_the_field_the_value_and_the_choices(check, value, message):
    with pytest.raises(PlanError) as info:
        check(value)
    assert str(info.value) == message


def test_a_good_name_comes_back():
    assert [check_sharding(s) for s in SHARDINGS] == ["none", "optimizer", "full", "proportional"]
    assert [check_shard_mode(s) for s in SHARD_MODES] == ["optimizer", "full"]
    assert check_sharding_choice("auto") == "auto"
    assert check_sharding("full", field="plan.sharding") == "full"


def test_every_layer_reads_the_names_of_the_levers_module():
    from autobatch.step import shard
    from autobatch.step.wrap import wrapping_for
    from launcher.job.spec import JobSpec

    assert get_args(JobSpec.model_fields["sharding"].annotation) == SHARDING_CHOICES
    assert memory.SHARDINGS is SHARDINGS and shard.SHARD_MODES is SHARD_MODES
    assert tuple(SHARDING_TERMS) == SHARDINGS  # one memory term per mode
    assert tuple(wrapping_for(s).sharding for s in SHARDINGS) == SHARDINGS  # one wrapping


def test_the_levers_module_is_on_the_ground_floor():
    tree = ast.parse(pathlib.Path(levers.__file__).read_text())
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
    }
    imported |= {
        a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
    }
    assert {m for m in imported if m.startswith("autobatch")} == {"autobatch.errors"}
    assert not {m.split(".")[0] for m in imported} & {"torch", "numpy", "ray", "launcher"}


# A replica: P = 40, G = 40, O = 80 (S = 160) bytes; root unit 4, largest unit 4.
STATE = ModelState(
    params_bytes=40, grads_bytes=40, optimizer_bytes=80, largest_unit_bytes=4, root_unit_bytes=4
)


@pytest.mark.parametrize(
    "sharding, W, term",
    [
        # a replica: the lines and the budget as measured
        ("none", 4, Term()),
        ("none", 1, Term()),
        # one rank: the sharded wrapping leaves the model whole; no DDP buckets to reserve
        ("optimizer", 1, Term(frees_replica_reserve=True)),
        ("full", 1, Term(frees_replica_reserve=True)),
        # P gathered next to P/W, O/W: -80 + (80 + 40) / 4; the optimizer step on shards
        ("optimizer", 4, Term(-50, 4, frees_replica_reserve=True)),
        # S/W plus the root and four units gathered at once: -160 + 40 + 4 + 4 * 4
        ("full", 4, Term(-100, 4, frees_replica_reserve=True)),
    ],
)
def test_each_sharding_mode_is_one_term_of_the_memory_model(sharding, W, term):
    assert sharding_term(STATE, sharding, W) == term
    assert STATE.per_rank(sharding, W) == STATE.total_bytes + term.micro_bytes


def test_a_term_for_an_unknown_mode_or_world_size_is_refused():
    with pytest.raises(PlanError, match="sharding='zero2' must be one of"):
        sharding_term(STATE, "zero2", 2)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="world_size=0 must be an integer >= 1"):
        sharding_term(STATE, "full", 0)


def test_the_example_of_docs_levers_md_prints_what_the_page_shows():
    # The page's last Python block plans a sharded job from public names; the block after
    # it is its output, word for word.
    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "levers.md").read_text()
    start = page.rindex("```python\n") + len("```python\n")
    code_end = page.index("```\n", start)
    shown_start = page.index("```\n", code_end + 4) + 4
    shown = page[shown_start : page.index("```\n", shown_start)]
    printed = subprocess.run(
        [sys.executable, "-c", page[start:code_end]], capture_output=True, text=True, check=True
    )
    assert printed.stdout == shown
