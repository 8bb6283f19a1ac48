"""Sharded data parallelism (FSDP2) on real gloo ranks: the full-batch step, and sharded
checkpoints that resume on another number of ranks.

Three ranks are spawned once (a module fixture) and train every scenario: ragged
micro-step counts for Sharded("optimizer"), equal counts of unequal micro-batches for
Sharded("full"), AdamW with gradient clipping through the Accumulator. The reference
is one process, no process group, the whole global batch as one micro-batch (the same
code: Sharded.wrap returns the plain module there). The 3-rank run also saves a sharded
checkpoint, which two ranks, and then one process with a plain model, load.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import nn
from torch.distributed.tensor import DTensor

from autobatch.errors import PlanError
from autobatch.step.accumulate import Accumulator
from autobatch.step.dcp import load_sharded, save_sharded
from autobatch.step.shard import Sharded, repeated_blocks, unit_bytes
from autobatch.step.wrap import wrapping_for
from autobatch.tasks.losses import IGNORE_INDEX
from autobatch.tasks.tiny_gpt import TinyGPT, TinyGPTConfig, token_loss_sum

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PLANS = {
    "optimizer": [[3, 3, 2], [4], [1, 1]],  # ragged: 3, 1 and 2 micro-steps
    "full": [[3, 3], [2, 2], [1, 1]],  # equal counts, unequal micro-batches
}
RESUME_PLAN = [[4, 3], [4, 3]]  # two ranks, "full", the same global batch as "optimizer"
STEPS = 3
SAVED_AT, RESUMED_FOR = 2, 2  # the checkpoint test: 2 steps on 3 ranks, then 2 on 2 ranks
MAX_GRAD_NORM = 0.05  # below every step's norm: clipping is on in every step
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


# ---------------------------------------------------------------------------
# the cases: a model, its summed loss, and global batch j's data (the same on every rank)


@dataclass(frozen=True)
class Case:
    build_model: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batch: Callable[[range], Any]  # the samples at these dataset indices as one micro-batch
    items: Callable[[range], int]  # their item count (samples, or target tokens)


def mlp(dtype: torch.dtype) -> nn.Module:
    """No nn.ModuleList: the root is the only sharded unit."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def sample_case(dtype: torch.dtype) -> Case:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=g).to(dtype), torch.randn(64, 1, generator=g).to(dtype)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return ((model(batch[0]) - batch[1]) ** 2).sum()

    return Case(lambda: mlp(dtype), loss, lambda idx: (x[idx], y[idx]), len)


GPT_CFG = TinyGPTConfig(vocab_size=16, seq_len=24, d_model=16, n_heads=2, n_layers=2)


def token_case(dtype: torch.dtype) -> Case:
    """Sequences of 2 to 24 tokens: micro-batches carry very different target counts."""
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 16, (2 + (i * 7) % 23,), generator=g) for i in range(64)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return TinyGPT(GPT_CFG).to(dtype)

    def batch(idx: range) -> dict[str, torch.Tensor]:
        chosen = [seqs[i] for i in idx]
        ids = torch.zeros(len(chosen), max(map(len, chosen)), dtype=torch.long)
        labels = torch.full(ids.shape, IGNORE_INDEX)
        for row, s in enumerate(chosen):
            ids[row, : len(s)] = labels[row, : len(s)] = s
        return {"input_ids": ids, "labels": labels}

    return Case(build, token_loss_sum, batch, lambda idx: sum(len(seqs[i]) - 1 for i in idx))


def lora_case(model_dir: str, data: str) -> Case:
    """The Hugging Face causal-LM task (tiny GPT-2) with a LoRA adapter (frozen weights) and
    activation checkpointing (each block's forward runs again in backward)."""
    from autobatch.tasks.causal_lm import causal_lm_task

    task = causal_lm_task(
        model_dir=model_dir,
        data=data,
        max_seq_len=40,
        lora={"r": 4},
        dtype="float64",
        gradient_checkpointing=True,
    )

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = task.build_model()
        with torch.no_grad():  # a trained adapter: with B = 0, A's gradient would be zero
            g = torch.Generator().manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return model

    return Case(build, task.loss_fn, task.batch, task.count_items)


def cases(model_dir: str, data: str) -> dict[tuple[str, torch.dtype], Callable[[], Case]]:
    return {
        ("sample", torch.float64): lambda: sample_case(torch.float64),
        ("sample", torch.float32): lambda: sample_case(torch.float32),
        ("token", torch.float64): lambda: token_case(torch.float64),
        ("token", torch.float32): lambda: token_case(torch.float32),
        ("lora", torch.float64): lambda: lora_case(model_dir, data),
    }


# ---------------------------------------------------------------------------
# training: the same code on a rank of a group and in the single reference process


@dataclass
class Trainer:
    case: Case
    wrapping: Sharded
    plan: list[list[int]]
    model: nn.Module
    acc: Accumulator

    @classmethod
    def build(cls, case: Case, mode: str, plan: list[list[int]]) -> Trainer:
        wrapping = Sharded(mode)
        wrapping.check_plan([len(sizes) for sizes in plan])
        model = wrapping.wrap(case.build_model(), torch.device("cpu"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
        acc = Accumulator(model, optimizer, max_grad_norm=MAX_GRAD_NORM, wrapping=wrapping)
        return cls(case, wrapping, plan, model, acc)

    def steps(self, rank: int, first: int, count: int) -> list[float]:
        """Global batches first .. first+count-1; returns each step's gradient norm."""
        size = sum(map(sum, self.plan))
        norms = []
        for j in range(first, first + count):
            start = j * size + sum(map(sum, self.plan[:rank]))
            micro_batches = []
            for n in self.plan[rank]:
                micro_batches.append(self.case.batch(range(start, start + n)))
                start += n
            n_items = self.case.items(range(j * size, (j + 1) * size))
            result = self.acc.step(micro_batches, self.case.loss_fn, global_items=n_items)
            norms.append(result.grad_norm)
        return norms


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, by name (a DTensor gathered from its shards)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


# ---------------------------------------------------------------------------
# what the ranks run


def three_rank_main(rank: int, world_size: int, model_dir: str, data: str, ckpt: str) -> dict:
    assert world_size == 3
    out: dict = {"trained": {}, "kinds": {}}
    for (kind, dtype), make in cases(model_dir, data).items():
        for mode, plan in PLANS.items():
            trainer = Trainer.build(make(), mode, plan)
            norms = trainer.steps(rank, 0, STEPS)
            out["trained"][kind, dtype, mode] = (full_params(trainer.model), norms)
    out["kinds"] = type(trainer.model).__name__, type(next(trainer.model.parameters())).__name__
    out["collectives"] = {mode: count_collectives(rank, mode) for mode in PLANS}
    out["fp16"] = fp16_overflow_in_one_shard(rank)
    trainer = Trainer.build(token_case(torch.float64), "optimizer", PLANS["optimizer"])
    trainer.steps(rank, 0, SAVED_AT)
    save_sharded(ckpt, trainer.model, trainer.acc.optimizer, extra={"step": SAVED_AT})
    out["shard_files"] = sorted(p.name for p in Path(ckpt).iterdir())
    return out


FSDP_COLLECTIVES = ("all_gather_single", "reduce_scatter_single")  # what FSDP2 calls


def count_collectives(rank: int, mode: str) -> dict[str, int]:
    """FSDP2's all-gathers and reduce-scatters in two steps of the tiny GPT."""
    calls = dict.fromkeys(FSDP_COLLECTIVES, 0)
    real = {name: getattr(dist, name) for name in FSDP_COLLECTIVES}

    def counting(name: str) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real[name](*args, **kwargs)

        return call

    trainer = Trainer.build(token_case(torch.float64), mode, PLANS[mode])
    try:
        for name in FSDP_COLLECTIVES:
            setattr(dist, name, counting(name))
        trainer.steps(rank, 0, 2)
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return calls


def fp16_overflow_in_one_shard(rank: int) -> tuple[bool, bool]:
    """An inf in rank 0's shard of one gradient only: (step skipped, parameters unchanged)."""
    case = token_case(torch.float32)
    wrapping = Sharded("optimizer")
    model = wrapping.wrap(case.build_model(), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = Accumulator(model, optimizer, precision="fp16", wrapping=wrapping)
    start = sum(map(sum, PLANS["optimizer"][:rank]))
    sizes = PLANS["optimizer"][rank]
    weight = 3 / case.items(range(14))
    for i, n in enumerate(sizes):
        batch = case.batch(range(start, start + n))
        acc.micro_step(batch, case.loss_fn, weight=weight, last=i == len(sizes) - 1)
        start += n
    if rank == 0:
        model.tok.weight.grad.to_local()[0, 0] = float("inf")
    before = full_params(model)
    _, skipped = acc.update()
    after = full_params(model)
    return skipped, all(torch.equal(before[n], after[n]) for n in before)


def two_rank_main(rank: int, world_size: int, ckpt: str) -> dict:
    assert world_size == 2
    trainer = Trainer.build(token_case(torch.float64), "full", RESUME_PLAN)
    extra = load_sharded(ckpt, trainer.model, trainer.acc.optimizer)
    trainer.steps(rank, extra["step"], RESUMED_FOR)
    return {"extra": extra, "params": full_params(trainer.model)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from autobatch.tasks.lm_example import make_tiny_model_dir

    return str(make_tiny_model_dir(tmp_path_factory.mktemp("gpt2") / "model", n_layers=2))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    text = "the cat sees a red dog and the fish swims far away"
    rows = [{"text": text[: 3 + (i * 7) % len(text)]} for i in range(64)]
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt") / "step-2")


@pytest.fixture(scope="module")
def three_ranks(model_dir, data, ckpt) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_ranks(three_rank_main, 3, model_dir, data, ckpt)


@pytest.fixture(scope="module")
def two_ranks(three_ranks, ckpt) -> list[dict]:
    return run_ranks(two_rank_main, 2, ckpt)


# ---------------------------------------------------------------------------
# the behaviours


def rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest |got - want| / |want| (norms) over the parameters. Not element-wise: Adam
    turns float32 rounding in a near-zero gradient element into a step of up to lr."""
    assert got.keys() == want.keys()
    return max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)


@pytest.mark.parametrize("mode", list(PLANS))
@pytest.mark.parametrize(
    "kind, dtype",
    [
        ("sample", torch.float64),
        ("sample", torch.float32),
        ("token", torch.float64),
        ("token", torch.float32),
        ("lora", torch.float64),
    ],
    ids=["sample-f64", "sample-f32", "token-f64", "token-f32", "lora-f64"],
)
def test_sharded_steps_on_three_ranks_equal_the_full_batch_steps(
    three_ranks, model_dir, data, mode, kind, dtype
):
    case = cases(model_dir, data)[kind, dtype]()
    want, want_norms = reference_for(case, mode)
    assert min(want_norms) > MAX_GRAD_NORM  # clipping is on in every step
    for rank, res in enumerate(three_ranks):
        got, norms = res["trained"][kind, dtype, mode]
        diff = rel_diff(got, want)
        assert diff <= TOLERANCE[dtype], f"rank {rank}: max relative diff {diff:.3g}"
        # clip_grad_norm_ on the DTensor gradients: the global norm, not this rank's shard's
        assert norms == pytest.approx(want_norms, rel=TOLERANCE[dtype])


def reference_for(case: Case, mode: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, no group, the whole global batch of the mode's plan at once."""
    trainer = Trainer.build(case, "optimizer", [[sum(map(sum, PLANS[mode]))]])
    norms = trainer.steps(0, 0, STEPS)
    return full_params(trainer.model), norms


def test_lora_keeps_frozen_weights_and_trains_only_the_adapter(three_ranks, model_dir, data):
    case = lora_case(model_dir, data)
    start = full_params(case.build_model())
    got, _ = three_ranks[0]["trained"]["lora", torch.float64, "optimizer"]
    moved = {n for n in start if not torch.equal(start[n], got[n])}
    assert moved and all("lora_" in n for n in moved)


def test_optimizer_sharding_gathers_and_reduces_once_per_unit_and_step_on_every_rank(
    three_ranks,
):
    # 3 units (2 blocks, the root), 2 steps; ranks run 3, 1 and 2 micro-steps
    for res in three_ranks:
        assert res["collectives"]["optimizer"] == {
            "all_gather_single": 6,
            "reduce_scatter_single": 6,
        }


def test_full_sharding_gathers_every_micro_step(three_ranks):
    # 2 steps of 2 micro-steps: forward 3 units + backward 2 blocks (the root stays
    # gathered through backward); one reduce-scatter per unit per micro-step
    for res in three_ranks:
        assert res["collectives"]["full"] == {
            "all_gather_single": 4 * 5,
            "reduce_scatter_single": 4 * 3,
        }


def test_fp16_inf_in_one_ranks_shard_skips_the_step_on_every_rank(three_ranks):
    assert [res["fp16"] for res in three_ranks] == [(True, True)] * 3


def test_wrapped_model_holds_dtensor_parameters(three_ranks):
    assert three_ranks[0]["kinds"][1] == "DTensor"
    assert three_ranks[0]["kinds"][0].startswith("FSDP")


def test_checkpoint_of_three_ranks_resumes_on_two_ranks_as_if_uninterrupted(two_ranks):
    trainer = Trainer.build(token_case(torch.float64), "optimizer", [[14]])
    trainer.steps(0, 0, SAVED_AT + RESUMED_FOR)
    want = full_params(trainer.model)
    for rank, res in enumerate(two_ranks):
        assert res["extra"] == {"step": SAVED_AT}
        diff = rel_diff(res["params"], want)
        assert diff <= 1e-10, f"rank {rank}: max relative diff {diff:.3g}"


def test_checkpoint_loads_into_a_plain_model_in_one_process(three_ranks, ckpt):
    trainer = Trainer.build(token_case(torch.float64), "optimizer", [[14]])
    trainer.steps(0, 0, SAVED_AT)
    want = full_params(trainer.model)
    model = token_case(torch.float64).build_model()
    assert load_sharded(ckpt, model) == {"step": SAVED_AT}
    assert rel_diff(full_params(model), want) <= 1e-10


def test_checkpoint_is_written_whole_then_renamed(three_ranks, ckpt):
    files = three_ranks[0]["shard_files"]
    assert ".metadata" in files and "extra.json" in files
    assert sum(f.endswith(".distcp") for f in files) == 3  # one file of shards per rank
    assert not Path(ckpt + ".tmp").exists()


# ---------------------------------------------------------------------------
# without a group, and the user-facing errors


def test_one_process_without_a_group_trains_the_plain_module():
    wrapping = Sharded("full")
    model = mlp(torch.float32)
    assert wrapping.wrap(model, torch.device("cpu")) is model
    assert wrapping.world_size(model) == 1


def test_full_sharding_refuses_a_plan_with_unequal_micro_step_counts():
    Sharded("full").check_plan([2, 2, 2])
    Sharded("optimizer").check_plan([3, 1, 2])
    with pytest.raises(PlanError, match=r"ranks run \[3, 1, 2\].*Sharded\('optimizer'\)"):
        Sharded("full").check_plan([3, 1, 2])


@pytest.mark.parametrize(
    "sharding, want",
    [
        ("none", "Replicated"),  # DDP: a replica per rank
        ("optimizer", "Sharded('optimizer')"),
        ("full", "Sharded('full')"),
    ],
)
def test_wrapping_for_names_the_wrapping_of_each_sharding(sharding, want):
    wrapping = wrapping_for(sharding)
    assert want in repr(wrapping) or type(wrapping).__name__ == want


def test_wrapping_for_an_unknown_sharding_names_the_choices():
    with pytest.raises(ValueError, match=r"sharding='zero2' must be one of 'none', 'optimizer'"):
        wrapping_for("zero2")


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match=r"mode='zero3' must be one of 'optimizer', 'full'"):
        Sharded("zero3")  # type: ignore[arg-type]


def test_repeated_blocks_are_the_outermost_module_list_members():
    model = TinyGPT(GPT_CFG)
    assert repeated_blocks(model) == list(model.blocks)
    assert repeated_blocks(mlp(torch.float32)) == []


def test_unit_bytes_are_the_largest_block_and_the_rest():
    model = TinyGPT(GPT_CFG)
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    assert unit_bytes(model) == (block, total - 2 * block)
    assert unit_bytes(mlp(torch.float64)) == (0, (5 * 8 + 8 + 8 + 1) * 8)


def test_one_process_checkpoint_replaces_an_older_one_and_leaves_no_temporaries(tmp_path):
    trainer = Trainer.build(sample_case(torch.float64), "optimizer", [[4]])
    path = tmp_path / "latest"
    save_sharded(path, trainer.model, trainer.acc.optimizer, extra={"step": 0})
    trainer.steps(0, 0, 1)
    save_sharded(path, trainer.model, trainer.acc.optimizer, extra={"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    fresh = Trainer.build(sample_case(torch.float64), "optimizer", [[4]])
    assert load_sharded(path, fresh.model, fresh.acc.optimizer) == {"step": 1}
    assert rel_diff(full_params(fresh.model), full_params(trainer.model)) == 0
    trainer.steps(0, 1, 1)  # the optimizer state came back too: the next step is the same
    fresh.steps(0, 1, 1)
    assert rel_diff(full_params(fresh.model), full_params(trainer.model)) == 0


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"directory='.*nothing' is not a sharded"):
        load_sharded(tmp_path / "nothing", mlp(torch.float32))
