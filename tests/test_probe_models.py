"""The probe on models the project did not write: a Hugging Face BERT classifier and a small
CNN (Conv2d, BatchNorm, ReLU, pooling, Linear), built in the test as `Task`s.

Each model is profiled on simulated devices; then real training steps (the Accumulator, each
rank's micro-batches) run under `TensorMemory`, entered around the step as the launcher's
simulated devices do, and the measured peak is compared with the prediction: the profile's
peak(b) for a replica on one process, and `capacity(sharding=, world_size=3)` on 3 gloo ranks
for DDP, "optimizer" and "full" sharding (`Sharded`). What each comparison showed:

- replica: peak(b) is 0-0.07 % above the measured peak (never below it by more than the
  step's float64 loss sum, 8 bytes), at the largest micro-batch and inside the measured sizes:
  the 2 % bound the built-in models meet (tests/test_profile.py) holds, and it is an upper
  bound.
- the micro-batch: the probe collates it inside its measurement, as a GPU holds it during
  its micro-step; on a simulated device the launcher collates it beforehand and CPU
  `to_device` is a no-op, so `TensorMemory` never sees it: the launcher's simulated peak is
  lower by one micro-batch's bytes (3.5 % for 3x32x32 images, 0.1 % for 32 tokens). The
  steps here hold each micro-batch on the device during its micro-step (`on_device`).
- DDP ("none" on 3 ranks): a rank also holds DDP's gradient buckets (G bytes), which the
  profile reserves outside peak(b): a rank holds the planned peak + G (within 0.07 %), so the
  planned peak alone is 3.7-7.4 % below what a BERT rank holds (issue 13's +6.7 %, measured
  against the plan's figure); the budget (usable - headroom - reserve) is right.
- "optimizer": FSDP2 splits every parameter's dim 0 in chunks of ceil(n / W) rows, padded:
  the gathered parameters hold W ceil(n / W) rows, and ranks 0..W-2 hold ceil(n / W) rows of
  parameters and optimizer state, where the memory model counts P / W. Ranks 0 and 1 held up
  to 12 kB (0.15 %) more than predicted, never more than `fsdp2_rounding_bytes`.
- "full": an upper bound on every rank, 0.3-3.3 % above (the memory model's notes: 2-24 %
  above FSDPMemTracker on a GPT).
- BERT's attention mask: with no padding token the model skips the 4-D mask (a data-dependent
  branch); a padded batch builds it, b x L x L bools alive to the end of the forward, where
  it can set the peak. A worst-case sample without padding misses it (up to 0.25 % here); one
  with a padded position takes that branch (`bert_task(padded=True)`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from distributed import run_ranks
from torch import nn
from torch.nn import functional as F

from autobatch.probe.devices import SimulatedDevice
from autobatch.probe.profile import ModelProfile, profile_model
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator, LossFn
from autobatch.step.shard import BlocksFn, Sharded, repeated_blocks
from autobatch.step.wrap import wrapping_for
from autobatch.tasks.task import Task

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

MiB = 2**20
SEQ_LEN, VOCAB, LABELS = 32, 500, 3
REPLICA_TOLERANCE = 0.02  # |predicted - measured| / measured, as for the built-in models
LOSS_SUM_BYTES = 8  # the step's float64 loss sum: the probe's micro-steps do not keep one
FULL_MARGIN = 0.25  # "full" may over-predict (the planner's notes: 2-24 % on a GPT)
WORLD = 3
SHARDED_DEVICES_MIB = (12, 8, 6)  # the 3 ranks' simulated devices


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops under a dispatch mode: threads only contend (40x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


# ---------------------------------------------------------------------------
# the models: a Hugging Face BERT classifier and a small CNN


def bert_task(*, padded: bool = False, probe_padding: bool | None = None) -> Task:
    """A 2-layer BERT (hidden 64, vocab 500) classifying 32-token sequences.

    `padded`: every second sample ends in padding. `probe_padding` (default: `padded`): the
    worst-case sample (full length) masks its last position, so that the probe runs the
    branch padded batches take (the 4-D attention mask); without it, the first sample."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=LABELS,
    )
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(64):
        ids = torch.randint(1, VOCAB, (SEQ_LEN,), generator=g)
        mask = torch.ones(SEQ_LEN, dtype=torch.long)
        if padded and i % 2:
            length = int(torch.randint(8, SEQ_LEN, (1,), generator=g))
            ids[length:], mask[length:] = config.pad_token_id, 0
        data.append((ids, mask, i % LABELS))

    def worst_case() -> tuple[torch.Tensor, torch.Tensor, int]:
        ids, mask, label = data[0]
        return ids, torch.cat([mask[:-1], mask.new_zeros(1)]), label

    def build() -> nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(config)

    def collate(items: list) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.stack([ids for ids, _, _ in items]),
            "attention_mask": torch.stack([mask for _, mask, _ in items]),
            "labels": torch.tensor([label for _, _, label in items]),
        }

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    worst = worst_case if (padded if probe_padding is None else probe_padding) else None
    return Task(build, data, collate, loss_fn, worst_case_sample=worst)


class SmallCNN(nn.Module):
    """Three conv blocks (Conv2d, BatchNorm2d, ReLU, MaxPool2d), global average, Linear."""

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def cnn_blocks(model: nn.Module) -> list[nn.Module]:
    """The CNN's sharding units (it has no ModuleList for `repeated_blocks` to find)."""
    return list(model.features)


def cnn_task() -> Task:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 32, 32, generator=g), i % 10) for i in range(64)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return SmallCNN()

    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    return Task(build, data, collate, loss_fn)


MODELS: dict[str, tuple[Callable[[], Task], BlocksFn]] = {
    "bert": (bert_task, repeated_blocks),  # its blocks: BertEncoder.layer, a ModuleList
    "bert-padded": (lambda: bert_task(padded=True), repeated_blocks),
    "bert-padded-unpadded-probe": (
        lambda: bert_task(padded=True, probe_padding=False),
        repeated_blocks,
    ),
    "cnn": (cnn_task, cnn_blocks),
}


# ---------------------------------------------------------------------------
# profiles, and training steps measured as a simulated device measures them


@functools.cache
def profiled(model: str, memory_mib: int, backend: str | None = None) -> ModelProfile:
    make_task, blocks = MODELS[model]
    device = SimulatedDevice(f"sim{memory_mib}", memory_mib * MiB)
    return profile_model(
        make_task(), device, make_optimizer=adamw, backend=backend, shard_blocks=blocks
    )


def _copy(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {k: _copy(v) for k, v in batch.items()}
    return type(batch)(_copy(v) for v in batch)


def on_device(loss_fn: LossFn) -> LossFn:
    """The loss with its micro-batch copied onto the device first, as `to_device` does on a
    GPU (and as the probe measures): the copy lives during its micro-step only."""
    return lambda model, batch: loss_fn(model, _copy(batch))


def batch_bytes(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.untyped_storage().nbytes()
    items = batch.values() if isinstance(batch, dict) else batch
    return sum(batch_bytes(v) for v in items)


def micro_batches(task: Task, sizes: list[int], offset: int = 0) -> list[Any]:
    """Consecutive dataset samples (cycling) as micro-batches of these sizes."""
    out, start = [], offset
    for b in sizes:
        out.append(task.batch([(start + i) % len(task.dataset) for i in range(b)]))
        start += b
    return out


def measured_peak(
    task: Task,
    model: nn.Module,
    acc: Accumulator,
    sizes: list[int],
    *,
    global_items: int,
    loss_fn: LossFn,
    offset: int = 0,
) -> int:
    """Peak live bytes of two optimizer steps (the first builds Adam's state), the
    micro-batches built beforehand, TensorMemory around each step as in the launcher."""
    memory = TensorMemory(None, model=model, optimizer=acc.optimizer)
    peak = 0
    for step in range(2):
        batches = micro_batches(task, sizes, offset + step * sum(sizes))
        with memory:
            acc.step(batches, loss_fn, global_items=global_items)
        peak = max(peak, memory.peak_bytes)
    return peak


def replica_peak(model_name: str, sizes: list[int], *, held: bool = True) -> int:
    task = MODELS[model_name][0]()
    model = task.build_model()
    model.train()
    acc = Accumulator(model, adamw(model))
    loss_fn = on_device(task.loss_fn) if held else task.loss_fn
    return measured_peak(task, model, acc, sizes, global_items=sum(sizes), loss_fn=loss_fn)


# ---------------------------------------------------------------------------
# a replica on one process


@pytest.mark.parametrize(
    ("model", "memory_mib", "micro_batch", "accumulation"),
    [
        # issue 13's devices; None: the largest micro-batch the profile allows
        ("bert", 40, None, 2),
        ("bert", 20, None, 4),
        ("bert", 16, None, 3),
        ("bert", 20, 6, 4),  # issue 13's 6 x 4: far inside the measured sizes
        ("bert-padded", 20, None, 2),  # padded batches: the 4-D mask, probed (see below)
        ("cnn", 40, None, 2),
        ("cnn", 20, None, 4),
        ("cnn", 16, None, 3),
        # the three ranks' devices below
        ("bert", 12, None, 2),
        ("bert", 6, None, 3),
        ("cnn", 8, None, 4),
    ],
)
def test_a_replicas_measured_peak_is_the_profiles_prediction(
    model, memory_mib, micro_batch, accumulation
):
    profile = profiled(model, memory_mib, "gloo")  # its peak(b) is the replica's, any backend
    b = micro_batch or profile.max_micro_batch
    predicted = profile.peak_bytes(b)
    measured = replica_peak(model, [b] * accumulation)
    assert abs(predicted - measured) <= REPLICA_TOLERANCE * measured, (b, predicted, measured)
    assert measured <= predicted + LOSS_SUM_BYTES, (b, predicted, measured)
    assert measured <= profile.budget_bytes + LOSS_SUM_BYTES
    # the plan's line (the chord over [1, max]) is never below peak(b) there
    assert profile.capacity("d").predicted_peak_bytes(b) >= predicted


def test_padded_batches_exceed_an_unpadded_probe_by_at_most_the_attention_mask():
    """With no padding token, BERT skips the 4-D attention mask (a data-dependent branch);
    a padded batch builds it, b x L x L bools alive to the end of the forward, which then
    sets the peak. A worst-case sample without padding never runs that branch: at b = 48
    padded batches held 28 kB (0.15 %) more than predicted, at b = 104 100 kB (0.25 %).
    bert_task(padded=True) masks its worst-case sample's last position: exact again."""
    model = "bert-padded-unpadded-probe"
    profile = profiled(model, 20, "gloo")
    b = profile.max_micro_batch
    measured = replica_peak(model, [b, b])
    assert measured <= profile.peak_bytes(b) + b * SEQ_LEN**2, (b, profile.peak_bytes(b))


def test_a_simulated_device_in_the_launcher_does_not_count_the_micro_batch():
    """Collated before the step, moved by a CPU `to_device` that copies nothing: the
    launcher's simulated peak is below the probe's (a GPU's) by one micro-batch."""
    b = profiled("cnn", 8, "gloo").max_micro_batch
    held = replica_peak("cnn", [b, b])
    as_launched = replica_peak("cnn", [b, b], held=False)
    images, labels = micro_batches(cnn_task(), [b])[0]
    # The images (3.5 % of the peak). The labels are counted either way: TensorMemory counts
    # a storage once an op returns it, and cross_entropy's first op returns a view of them.
    assert held - as_launched == batch_bytes(images)


# ---------------------------------------------------------------------------
# three gloo ranks: DDP, "optimizer" and "full" sharding


def _capacities(model: str, mode: str) -> list:
    return [
        profiled(model, mib, "gloo").capacity(f"d{i}", sharding=mode, world_size=WORLD)
        for i, mib in enumerate(SHARDED_DEVICES_MIB)
    ]


def _rank_plans(model: str, mode: str) -> list[list[int]]:
    """Each rank at its device's largest micro-batch for the mode, accumulating two."""
    return [[cap.max_micro_batch] * 2 for cap in _capacities(model, mode)]


CASES = [(m, mode) for m in ("bert", "cnn") for mode in ("none", "optimizer", "full")]


def rank_main(rank: int, world_size: int, plans: dict) -> dict:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    peaks = {}
    for (name, mode), rank_plans in plans.items():
        make_task, blocks = MODELS[name]
        task = make_task()
        wrapping = wrapping_for("none") if mode == "none" else Sharded(mode, blocks=blocks)
        model = wrapping.wrap(task.build_model(), torch.device("cpu"))
        acc = Accumulator(model, adamw(model), wrapping=wrapping)
        sizes = rank_plans[rank]
        offset = sum(sum(p) for p in rank_plans[:rank])  # each rank its own samples
        total = sum(sum(p) for p in rank_plans)
        peaks[name, mode] = measured_peak(
            task,
            model,
            acc,
            sizes,
            global_items=total,
            loss_fn=on_device(task.loss_fn),
            offset=offset,
        )
    return peaks


@pytest.fixture(scope="module")
def rank_peaks() -> list[dict]:
    plans = {case: _rank_plans(*case) for case in CASES}
    return run_ranks(rank_main, WORLD, plans)


def fsdp2_rounding_bytes(model: nn.Module, world_size: int) -> int:
    """What FSDP2 holds on rank 0 beyond exact 1/W shards: each parameter's dim 0 is split
    in chunks of ceil(n / W) rows (padded on the last rank), so the gathered parameters
    hold W ceil(n / W) rows and rank 0 holds ceil(n / W) rows of parameters, gradients and
    AdamW's two moments."""
    params = list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    chunk = sum(
        math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0]) * p.element_size()
        for p in params
    )
    return math.ceil((world_size * chunk - total) + 4 * (chunk - total / world_size))


@pytest.mark.parametrize(("model", "mode"), CASES)
def test_a_ranks_measured_peak_against_its_sharded_capacity(rank_peaks, model, mode):
    caps = _capacities(model, mode)
    for rank, cap in enumerate(caps):
        b = cap.max_micro_batch
        predicted = cap.memory.peak_bytes(b, mode, WORLD)
        measured = rank_peaks[rank][model, mode]
        assert cap.predicted_peak_bytes(b) >= predicted  # the plan's chord
        if mode == "none":
            # DDP's gradient buckets: in the profile's reserve, not in peak(b)
            buckets = cap.memory.replica_reserve_bytes
            assert buckets == cap.memory.state.grads_bytes
            assert predicted + buckets <= (1 + REPLICA_TOLERANCE) * measured, (rank, b)
            assert measured <= predicted + buckets + LOSS_SUM_BYTES, (rank, b)
            assert measured <= cap.memory.budget("none") + buckets + LOSS_SUM_BYTES
        elif mode == "optimizer":
            # FSDP2's shards are ceil(n / W) rows: ranks 0..W-2 hold more than P / W
            rounding = fsdp2_rounding_bytes(MODELS[model][0]().build_model(), WORLD)
            assert measured <= predicted + rounding, (rank, b, predicted, measured)
            assert predicted <= (1 + REPLICA_TOLERANCE) * measured, (rank, b)
        else:
            assert measured <= predicted <= (1 + FULL_MARGIN) * measured, (rank, b)
