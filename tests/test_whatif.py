"""The what-if: a causal LM from its config.json alone, traced at two shallow depths and
scaled to its own, and every lever combination planned on declared GPUs.

Configs are written here (a tiny Llama: hidden 64, vocab 256; an 8B-shaped one whose
weights are never materialised: meta and fake tensors only). Nothing is downloaded, and
no tokenizer, weights or data exist next to the configs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import autobatch

from autobatch.errors import DeviceSpecError
from autobatch.planning.memory import SHARDINGS
from autobatch.probe.estimate import GPU_SPECS, StepTrace, _ops_time, trace_step
from autobatch.probe.lm_depth import (
    SIZES,
    load_lm_config,
    shallow_copies,
    synthetic_task,
    trace_lm,
)
from autobatch.probe.peak import peak_at
from autobatch.probe.whatif import LMJob, Outcome, estimate_lm_capacities, what_if
from autobatch.tasks.causal_lm import CausalLMError
from autobatch.tasks.lora import LoraSpec

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOLERANCE = 0.01  # depth scaling against the full trace (measured: exact to float rounding)

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
}
LLAMA_8B = {  # Llama 3 8B's shape
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
# Gemma 2 alternates sliding and full attention (layer_types): traced at 2 and 4 layers
TINY_GEMMA2 = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "sliding_window": 32,
}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "vocab_size": 256, "n_positions": 256}


def config_dir(root: Path, config: dict, **overrides: object) -> str:
    """A model directory holding only a config.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({**config, **overrides}))
    return str(root)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def lm_job(model_dir: str, **fields: object) -> LMJob:
    defaults = dict(max_seq_len=64, global_batch_size=64, make_optimizer=adamw)
    return LMJob(model_dir=model_dir, **{**defaults, **fields})


# ---------------------------------------------------------------------------
# depth scaling against the full trace


def assert_same_step(scaled: StepTrace, full: StepTrace) -> None:
    """Peaks (micro-steps and optimizer step, inside and beyond the traced sizes), the
    model's state, and the time on two GPUs, within TOLERANCE."""
    for b in (1, *SIZES, 64):
        assert peak_at(scaled.peak_lines, b) == pytest.approx(
            peak_at(full.peak_lines, b), rel=TOLERANCE
        )
    assert scaled.peak_lines[-1].at(1) == pytest.approx(full.peak_lines[-1].at(1), rel=TOLERANCE)
    for field in ("params_bytes", "grads_bytes", "optimizer_bytes", "largest_unit_bytes"):
        assert getattr(scaled.state, field) == pytest.approx(
            getattr(full.state, field), rel=TOLERANCE
        )
    for gpu in (GPU_SPECS["A100-80GB"], GPU_SPECS["T4-16GB"]):
        for s, f in zip(scaled.micro_ops, full.micro_ops):
            assert _ops_time(s, gpu) == pytest.approx(_ops_time(f, gpu), rel=TOLERANCE)
        assert _ops_time(scaled.optimizer_ops, gpu) == pytest.approx(
            _ops_time(full.optimizer_ops, gpu), rel=TOLERANCE
        )


@pytest.mark.parametrize(
    ("config", "layers", "lora", "checkpointing", "precision"),
    [
        (TINY_LLAMA, 4, False, False, "fp32"),  # full fine-tune, the plainest step
        (TINY_LLAMA, 8, False, True, "fp32"),  # checkpointing: one layer recomputed at a time
        (TINY_LLAMA, 4, True, False, "bf16"),  # LoRA under autocast: frozen base, cast weights
        (TINY_LLAMA, 8, True, True, "bf16"),  # every lever at once
        (TINY_GPT2, 6, True, False, "fp32"),  # GPT-2: Conv1D projections, n_layer
        # alternating layers: scaled by periods of 2 (at 64 tokens and b = 2 the peak's moment
        # moves with depth, cast weights weighing as much as activations: 1.5 % under)
        (TINY_GEMMA2, 6, False, True, "bf16"),
    ],
)
def test_the_depth_scaled_trace_matches_the_full_trace(
    tmp_path, config, layers, lora, checkpointing, precision
):
    key = "n_layer" if config["model_type"] == "gpt2" else "num_hidden_layers"
    lm = load_lm_config(config_dir(tmp_path / "model", config, **{key: layers}), 128)
    assert lm.layers == layers and lm.depths == ((2, 4) if "gemma" in lm.name else (1, 2))
    kwargs = dict(
        seq_len=128, lora=LoraSpec() if lora else None, gradient_checkpointing=checkpointing
    )
    full = trace_step(
        synthetic_task(lm.model_dir, vocab_size=256, **kwargs),
        make_optimizer=adamw,
        precision=precision,
        sizes=SIZES,
    )
    with shallow_copies(lm) as dirs:
        scaled = trace_lm(lm, dirs, make_optimizer=adamw, precision=precision, **kwargs)
    assert_same_step(scaled, full)


def test_an_8b_config_is_estimated_in_seconds_without_materialising_weights(tmp_path):
    model_dir = config_dir(tmp_path / "llama-8b", LLAMA_8B)  # a config.json, nothing else
    job = lm_job(model_dir, max_seq_len=2048, dtype="bfloat16", own_precision="bf16")
    t0 = time.monotonic()
    caps = estimate_lm_capacities(job, "1xA100-80GB,1xL4-24GB")
    seconds = time.monotonic() - t0
    state = caps[0].memory.state
    assert state.params_bytes == 2 * 8_030_261_248  # Llama 3 8B's parameters, in bfloat16
    assert state.optimizer_bytes == 2 * state.params_bytes  # AdamW: two moments per parameter
    a100, l4 = caps
    assert a100.max_micro_batch == 0 and l4.max_micro_batch == 0  # a full replica fits neither
    assert a100.sharded("full", 2).max_micro_batch >= 1  # sharded over both, it fits the A100
    assert seconds < 120  # the whole model's trace took 322 s; two 1- and 2-layer ones take a few


# ---------------------------------------------------------------------------
# the levers


LLAMA_1B = {
    **TINY_LLAMA,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A 1.5B Llama on an A100 and two T4s: a replica in fp32 fits the A100, not a T4; the
    levers decide. Fake tensors cost by the op, not the size: it traces as fast as a tiny one."""
    model_dir = config_dir(tmp_path_factory.mktemp("m") / "model", LLAMA_1B)
    job = lm_job(model_dir, max_seq_len=1024, own_precision="auto", own_lora=True)
    return what_if(job, "1xA100-80GB,2xT4-16GB")


def levers_of(o: Outcome) -> tuple:
    lv = o.levers
    return (lv.precision, lv.lora, lv.gradient_checkpointing, lv.sharding)


def test_every_combination_of_levers_is_a_row(mixed):
    result = mixed
    levers = [levers_of(o) for o in result.outcomes]
    # a T4 has no bf16: fp32 and fp16 only, and a note says why
    assert levers == [
        (p, lora, ckpt, s)
        for p in ("fp32", "fp16")
        for lora in (False, True)
        for ckpt in (False, True)
        for s in SHARDINGS
    ]
    assert any("bf16 left out: T4-16GB has no bf16" in n for n in result.notes)
    assert result.own is not None and result.own.precision == "fp16"  # auto, as the launcher


def test_a_combination_fits_when_every_device_fits_one_sample(mixed):
    result = mixed
    assert 0 < sum(o.fits for o in result.outcomes) < len(result.outcomes)
    for o in result.outcomes:
        assert [d.name for d in o.devices] == ["A100-80GB", "T4-16GB"]
        for d in o.devices:  # the figures the fit is decided by, never contradicting it
            assert (d.max_micro_batch >= 1) == (d.needs_bytes <= d.has_bytes)
        if o.fits:
            assert all(d.max_micro_batch >= 1 for d in o.devices)
            assert sum(r.samples for r in o.plan.ranks) == result.global_batch_size
            assert o.plan.sharding == o.levers.sharding


def test_levers_lower_what_one_sample_needs(mixed):
    needs = {levers_of(o): o.devices[1].needs_bytes for o in mixed.outcomes}  # on a T4
    plain = needs["fp32", False, False, "none"]
    assert needs["fp32", False, False, "full"] < plain  # the state shared over 3 ranks
    assert needs["fp32", True, False, "none"] < plain  # no gradients or moments for the base
    assert needs["fp32", False, True, "none"] < plain  # one layer's activations at a time


def test_the_own_and_the_fastest_combinations_are_marked(mixed):
    result = mixed
    fastest = result.fastest()
    assert fastest is not None
    assert fastest.samples_per_s == max(o.samples_per_s for o in result.outcomes if o.fits)
    rows = result.table_rows()
    assert sum("fastest" in r[""] for r in rows) == 1 and sum("spec" in r[""] for r in rows) == 1
    data = result.to_dict()
    assert data["fastest"] == fastest.levers.to_dict() and data["own"] == result.own.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON as it is


def test_a_combination_that_does_not_fit_says_where_and_by_how_much(mixed):
    unfit = [o for o in mixed.outcomes if o.problem and o.problem.startswith("does not fit: ")]
    assert unfit
    for o in unfit:
        for d in o.devices:
            gib = f"needs {d.needs_bytes / 2**30:.2f} GiB, has {d.has_bytes / 2**30:.2f} GiB"
            assert (f"{d.name}: {gib}" in o.problem) == (d.max_micro_batch == 0), o.problem


def test_proportional_fits_by_its_joint_plan_not_by_even_shares(mixed):
    """Its shares are the plan's to choose: a T4 may hold little or none of the state, so
    it fits where 1/3 of the state each (full's figures, or proportional's even ones) does
    not; and every planned rank stays within its budget at its share."""
    by_levers = {levers_of(o): o for o in mixed.outcomes}
    full = by_levers["fp32", False, False, "full"]
    prop = by_levers["fp32", False, False, "proportional"]
    assert not full.fits and prop.fits, (full.problem, prop.problem)
    for o in mixed.outcomes:
        if o.levers.sharding != "proportional" or not o.fits:
            continue
        plan, W = o.plan, o.plan.world_size
        state = plan.inputs[0].memory.state
        assert sum(plan.state_slices) == state.grads_bytes // 4  # the model, once
        for r, d in zip(plan.ranks, plan.inputs, strict=True):
            assert r.predicted_peak_bytes <= d.memory.budget("proportional", W)
        assert sum(o.to_dict()["state_shares"]) == pytest.approx(1.0)
    t4 = next(d for d in prop.plan.inputs if d.name == "T4-16GB")
    even = t4.memory.peak_bytes(1, "proportional", 3)  # 1/3 of the state each
    assert even > t4.memory.budget("proportional", 3)


def test_the_summary_names_what_only_one_sharding_mode_fits(mixed):
    only = mixed.only_with()
    for o in mixed.outcomes:  # brute force over the table
        same = [p for p in mixed.outcomes if levers_of(p)[:3] == levers_of(o)[:3]]
        alone = o.fits and sum(p.fits for p in same) == 1
        assert (o.levers in only.get(o.levers.sharding, [])) == alone
    assert [lv.precision for lv in only["proportional"]] == ["fp32"]
    for o in mixed.outcomes:  # the launcher refuses fp16 with proportional; so does the table
        if o.levers.sharding == "proportional" and o.levers.precision == "fp16":
            assert not o.fits and o.problem.startswith("not supported: fp16's loss scaler")
    line = next(x for x in mixed.summary_lines() if "only with sharding proportional" in x)
    assert "fp32, no LoRA, no checkpointing" in line
    assert mixed.to_dict()["only_with"]["proportional"][0]["lora"] is False


# ---------------------------------------------------------------------------
# errors: one line naming the thing and what is allowed


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        # a config that AutoModelForCausalLM cannot build
        (
            lambda p: config_dir(p, {"model_type": "t5", "d_model": 64}),
            CausalLMError,
            r"'t5' model \(T5Config\).*causal LM",
        ),
        (lambda p: str(p / "absent"), CausalLMError, r"model_dir=.*absent': no such directory"),
        (lambda p: (p.mkdir(), str(p))[1], CausalLMError, r"has no config.json"),
        (
            lambda p: config_dir(p, TINY_LLAMA, max_position_embeddings=32),
            CausalLMError,
            r"max_seq_len=64 exceeds the model's max_position_embeddings=32",
        ),
        # a model_type this transformers does not know: one line, not transformers' page
        (
            lambda p: config_dir(p, {"model_type": "foo"}),
            CausalLMError,
            r"config.json has model_type='foo', which transformers .* does not know; causal "
            r"LMs it knows: llama",
        ),
        (
            lambda p: (p.mkdir(), (p / "config.json").write_text("{"), str(p))[2],
            CausalLMError,
            r"config.json is not JSON \(Expecting",
        ),
    ],
    ids=["not-a-causal-lm", "no-directory", "no-config", "too-long", "unknown-type", "not-json"],
)
def test_a_model_dir_it_cannot_use_is_named(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        what_if(lm_job(make(tmp_path / "model")), "1xA100-80GB")


def test_a_bad_device_entry_is_named(tmp_path):
    model_dir = config_dir(tmp_path / "m", TINY_LLAMA, num_hidden_layers=2)
    with pytest.raises(DeviceSpecError, match=r"unknown GPU 'B200'.*known: A10-24GB"):
        what_if(lm_job(model_dir), "2xA100-80GB,1xB200")


# ---------------------------------------------------------------------------
# the command


def write_spec(tmp_path: Path, model_dir: str, **fields: object) -> str:
    spec = {
        "name": "whatif",
        "task": "causal_lm",
        "max_seq_len": 128,
        # no tokenizer next to the config, and no data file: the what-if reads neither
        "task_args": {"model_dir": model_dir, "data": str(tmp_path / "absent.jsonl")},
        "global_batch_size": 32,
        "max_steps": 1,
        **fields,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_what_if_prints_a_table_of_every_combination(tmp_path, capsys):
    from launcher.cli import main  # in this process: a subprocess costs seconds of imports

    model_dir = config_dir(tmp_path / "m", TINY_LLAMA, num_hidden_layers=2)
    spec = write_spec(tmp_path, model_dir, precision="bf16")
    assert main(["plan", spec, "--what-if", "--devices", "2xA100-80GB,1xL4-24GB"]) == 0
    out = capsys.readouterr().out
    assert "what if: llama, 2 layers, global batch 32" in out
    assert "A100-80GB x2" in out and "L4-24GB x1" in out
    assert "spec (bf16, no LoRA, no checkpointing, sharding none)" in out
    assert "fastest that fits" in out


def test_what_if_as_json_holds_the_specs_own_levers(tmp_path, capsys):
    from launcher.cli import main  # in this process: a subprocess costs seconds of imports

    model_dir = config_dir(tmp_path / "m", TINY_LLAMA, num_hidden_layers=2)
    task_args = {
        "model_dir": model_dir,
        "data": "absent.jsonl",
        "lora": {"r": 4},
        "gradient_checkpointing": True,
    }
    spec = write_spec(tmp_path, model_dir, task_args=task_args)
    assert main(["plan", spec, "--what-if", "--devices", "1xH100-80GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    own = {"precision": "fp32", "lora": True, "gradient_checkpointing": True, "sharding": "none"}
    assert data["own"] == own and [r["own"] for r in data["rows"]].count(True) == 1
    assert len(data["rows"]) == 2 * 2 * 2 * 4 and data["estimated"]  # fp32, bf16 (an H100)
    assert all(math.isfinite(r["samples_per_s"]) for r in data["rows"] if r["fits"])


def test_a_causal_lm_dry_run_needs_only_the_config(tmp_path, capsys):
    from launcher.cli import main  # in this process: a subprocess costs seconds of imports

    model_dir = config_dir(tmp_path / "m", TINY_LLAMA, num_hidden_layers=2)
    spec = write_spec(tmp_path, model_dir, sharding="full")
    assert main(["plan", spec, "--dry-run", "--devices", "2xA100-80GB,2xT4-16GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["sharding"] == "full" and all(d["estimated"] for d in plan["inputs"])
    assert sum(sum(r["micro_batches"]) for r in plan["ranks"]) == 32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["configs/demo.yaml", "--what-if", "--devices", "1xA100-80GB"],
            "error: --what-if needs task causal_lm",
        ),
        (["configs/demo.yaml", "--what-if"], "error: --what-if needs --devices"),
    ],
)
def test_what_if_errors_end_in_one_line_and_exit_2(args, message):
    result = autobatch("plan", *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_a_config_that_is_not_a_causal_lm_ends_in_one_line(tmp_path):
    model_dir = config_dir(tmp_path / "m", {"model_type": "t5", "d_model": 64})
    result = autobatch(
        "plan", write_spec(tmp_path, model_dir), "--what-if", "--devices", "A100-80GB"
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "which AutoModelForCausalLM cannot build" in lines[0], result.stderr


@pytest.mark.slow
def test_the_8b_what_if_takes_seconds_not_minutes(tmp_path):
    model_dir = config_dir(tmp_path / "llama-8b", LLAMA_8B)
    spec = write_spec(
        tmp_path,
        model_dir,
        max_seq_len=2048,
        precision="bf16",
        task_args={
            "model_dir": model_dir,
            "data": "x.jsonl",
            "lora": {"r": 16},
            "dtype": "bfloat16",
        },
    )
    t0 = time.monotonic()
    result = autobatch("plan", spec, "--what-if", "--devices", "2xA100-80GB,4xT4-16GB", timeout=300)
    seconds = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert "llama, 32 layers" in result.stdout and "fastest that fits" in result.stdout
    # a full fine-tune fits those T4s only when the A100s hold most of the state
    only = "fits only with sharding proportional: fp32, no LoRA, checkpointing\n"
    assert only in result.stdout, result.stdout
    assert seconds < 120, f"{seconds:.1f} s"  # 322 s before depth scaling; ~15 s on a quiet box
