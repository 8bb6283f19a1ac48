"""The job spec: every bad input names the field, the value and what is allowed."""

from __future__ import annotations

import pathlib

import pytest

from launcher.errors import SpecError, TaskError
from launcher.job.spec import JobSpec, load_spec, parse_spec
from launcher.job.tasks import load_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = {"name": "j", "global_batch_size": 8, "max_steps": 2}


def test_shipped_configs_are_valid():
    for path in (ROOT / "configs").glob("*.yaml"):
        spec = load_spec(path)
        assert isinstance(spec, JobSpec)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"global_batch_size": 0},
            r"global_batch_size: Input should be greater than or equal "
            r"to 1 \(got 0\)",
        ),
        ({"name": "Bad Name"}, r"name: String should match pattern .* \(got 'Bad Name'\)"),
        ({"max_steps": None}, r"give max_steps or epochs"),
        ({"bogus": 1}, r"bogus: Extra inputs are not permitted"),
        (
            {"precision": "fp8"},
            r"precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16' "
            r"\(got 'fp8'\)",
        ),
        ({"optimizer": {"lr": -1}}, r"optimizer.lr: Input should be greater than 0"),
        ({"optimizer": {"name": "lion"}}, r"optimizer.name: Input should be 'adamw' or 'sgd'"),
        (
            {"task": "not an entrypoint"},
            r"task: task='not an entrypoint' must be one of tiny_gpt, causal_lm or "
            r"an entrypoint 'package.module:function'",
        ),
        ({"task": "causal_lm", "task_args": {"model_dir": "m", "data": "d"}}, r"needs max_seq_len"),
        ({"task_args": {"layers": 3}}, r"task_args \(tiny_gpt\): layers: Extra inputs are not"),
        (
            {"task": "causal_lm", "max_seq_len": 64, "task_args": {"model_dir": "m"}},
            r"task_args \(causal_lm\): data: Field required",
        ),
        (
            {
                "task": "causal_lm",
                "max_seq_len": 64,
                "task_args": {"model_dir": "m", "data": "d", "lora": {"rank": 8}},
            },
            r"task_args \(causal_lm\): lora.rank: Extra inputs are not permitted",
        ),
        (
            {
                "task": "causal_lm",
                "max_seq_len": 64,
                "task_args": {"model_dir": "m", "data": "d", "dtype": "float8"},
            },
            r"task_args \(causal_lm\): dtype: Input should be 'float32', 'bfloat16' or 'float64'",
        ),
        ({"devices": {"select": "count"}}, r"devices: select='count' needs count"),
        ({"devices": {"select": "simulated"}}, r"needs a list of simulated devices"),
        (
            {"devices": {"select": "name", "name_pattern": "(("}},
            r"name_pattern='\(\(' is not a "
            r"regex",
        ),
        (
            {"devices": {"select": "simulated", "simulated": [{"name": "x", "memory": "lots"}]}},
            r"devices.simulated.0.memory: .*memory 'lots' is not a size",
        ),
        (
            {
                "devices": {
                    "select": "simulated",
                    "simulated": [{"name": "x", "memory": "1GiB", "speed": 0}],
                }
            },
            r"devices.simulated.0.speed: Input should be greater than 0",
        ),
        ({"memory_headroom": 1.5}, r"memory_headroom: Input should be less than 1"),
        (
            {"devices": {"select": "count", "count": 2, "min_count": 3}},
            r"devices: min_count=3 is more than the 2 device\(s\) selected; allowed: 1 to 2",
        ),
        (
            {
                "devices": {
                    "select": "simulated",
                    "min_count": 2,
                    "simulated": [{"name": "x", "memory": "1GiB"}],
                }
            },
            r"min_count=2 is more than the 1 device\(s\) selected",
        ),  # fmt: skip
        ({"devices": {"select": "all", "min_count": 0}}, r"devices.min_count: .*greater than or"),
        ({"devices": {"select": "all", "min_count": "two"}}, r"devices.min_count: .*integer"),
        (
            {"devices": {"select": "name", "name_pattern": "A100", "min_count": 1}},
            r"min_count needs a known device count: select 'name'",
        ),
        ({"priority": 10**6}, r"priority: Input should be less than or equal to 1000"),
        ({"priority": 1.5}, r"priority: .*integer"),
        ({"faults": [{"kind": "meteor", "rank": 0, "step": 1}]}, r"faults.0.kind"),
    ],
)
def test_bad_specs_are_rejected_with_the_field_named(change, match):
    with pytest.raises(SpecError, match=match):
        parse_spec({**BASE, **change})


def test_total_steps_is_the_smaller_of_max_steps_and_epochs():
    spec = parse_spec({**BASE, "max_steps": 100, "epochs": 2})
    assert spec.total_steps(steps_per_epoch=10) == 20
    assert parse_spec({**BASE, "max_steps": 5, "epochs": 2}).total_steps(10) == 5


def test_yaml_problems_are_reported_with_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read job spec .*missing.yaml"):
        load_spec(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="a job spec is a mapping of fields, got list"):
        load_spec(listy)


@pytest.mark.parametrize(
    "task, args, match",
    [
        ("no_such_module_xyz:make", {}, r"cannot import module 'no_such_module_xyz'"),
        ("json:no_such_function", {}, r"json has no function 'no_such_function'"),
        ("json:dumps", {"obj": 1}, r"returned str, not an autobatch.Task"),
    ],
)
def test_bad_tasks_are_rejected_at_load(task, args, match):
    with pytest.raises(TaskError, match=match):
        load_task(parse_spec({**BASE, "task": task, "task_args": args}))


def test_entrypoint_task_is_loaded_from_a_module():
    task = load_task(
        parse_spec(
            {
                **BASE,
                "task": "autobatch.tasks.tiny_gpt:tiny_gpt_task",
                "task_args": {"dataset_size": 10},
            }
        )
    )
    assert len(task.dataset) == 10
