"""The Hugging Face causal-LM task: data checks, masking, the summed token loss, and the
full-batch token-mean gradient on ragged real gloo ranks (invariant 3 of docs/design.md).

Everything runs on a tiny random model written locally (2 layers, d_model 32): nothing
is downloaded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.errors import AutobatchError
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.causal_lm import (
    CausalLMError,
    causal_lm_task,
    collate,
    item_count,
)
from autobatch.tasks.lm_example import main, make_example_jsonl, make_tiny_model_dir
from autobatch.tasks.losses import IGNORE_INDEX
from autobatch.tasks.task import Task, model_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("gpt2") / "model"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("llama") / "model", arch="llama"))


@pytest.fixture
def data(tmp_path) -> str:
    rows = [{"text": "the cat sees the dog"}, {"prompt": "add: 1 + 2 =", "completion": " 3"}]
    return str(write_jsonl(tmp_path / "data.jsonl", rows))


# ---------------------------------------------------------------------------
# user-facing errors name the field, the line and what is allowed

GOOD = {"text": "a red fish"}
ALLOWED = r'expected \{"text": \.\.\.\} or \{"prompt": \.\.\., "completion": \.\.\.\}'


@pytest.mark.parametrize(
    "rows, kwargs, match",
    [
        # the model directory does not exist
        ([GOOD], {"model_dir": "/nonexistent/model"}, r"model_dir='/nonexistent/model': no such"),
        # a directory without config.json (e.g. a hub id typed as a path)
        ([GOOD], {"model_dir": "EMPTY"}, r"model_dir='.*' has no config.json"),
        # the data file does not exist
        (None, {"data": "/nonexistent/data.jsonl"}, r"data='/nonexistent/data.jsonl': no such"),
        # an empty file, blank lines only
        (["", "  "], {}, r"data='.*data.jsonl': the file has no samples"),
        # line 2 is not JSON
        ([GOOD, "{'text': 'single quotes'}"], {}, rf"data.jsonl:2: not valid JSON .*; {ALLOWED}"),
        # a JSON value that is not an object
        ([GOOD, GOOD, '["a", "b"]'], {}, rf"data.jsonl:3: {ALLOWED}, got a JSON list"),
        # wrong keys
        ([{"input": "x", "output": "y"}], {}, rf"data.jsonl:1: {ALLOWED}, got keys \['input', 'o"),
        # a completion without its prompt
        ([{"completion": "y"}], {}, r"data.jsonl:1: .* got keys \['completion'\]"),
        # an extra key
        ([{"text": "x", "id": 3}], {}, r"data.jsonl:1: .* got keys \['id', 'text'\]"),
        # a value that is not a string
        ([GOOD, {"prompt": "1 + 1 =", "completion": 2}], {}, r"data.jsonl:2: 'completion' must"),
        # no room for a target
        ([GOOD], {"max_seq_len": 1}, r"max_seq_len=1 must be an integer >= 2"),
        # longer than the model's positions (256)
        ([GOOD], {"max_seq_len": 257}, r"max_seq_len=257 exceeds .*max_position_embeddings=256"),
        # every prompt fills max_seq_len: nothing to learn
        ([{"prompt": "a b c d e f g h", "completion": "x"}], {"max_seq_len": 3}, r"all 1 samples"),
        # an unknown LoRA key
        ([GOOD], {"lora": {"rank": 8}}, r"lora.rank: Extra inputs are not permitted"),
        # a bad LoRA value
        (
            [GOOD],
            {"lora": {"r": 0}},
            r"lora.r: Input should be greater than or equal to 1",
        ),
        (
            [GOOD],
            {"lora": {"dropout": 1.5}},
            r"lora.dropout: Input should be less than 1 \(got 1.5",
        ),
        # a dtype the task does not train in
        (
            [GOOD],
            {"dtype": "float16"},
            r"dtype='float16' must be one of float32, bfloat16, float64",
        ),
    ],
)
def test_bad_input_raises_an_error_naming_the_field_or_line(
    tmp_path, model_dir, rows, kwargs, match
):
    (tmp_path / "EMPTY").mkdir()
    args = {"model_dir": model_dir, "max_seq_len": 32}
    if rows is not None:
        args["data"] = str(write_jsonl(tmp_path / "data.jsonl", rows))
    args.update(kwargs)
    if args["model_dir"] == "EMPTY":
        args["model_dir"] = str(tmp_path / "EMPTY")
    with pytest.raises(CausalLMError, match=match) as info:
        causal_lm_task(**args)
    assert isinstance(info.value, AutobatchError) and isinstance(info.value, ValueError)


def test_missing_transformers_raises_an_install_hint(monkeypatch, model_dir, data):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now fails
    with pytest.raises(CausalLMError, match=r"pip install 'autobatch\[hf\]'"):
        causal_lm_task(model_dir=model_dir, data=data, max_seq_len=32)


def test_core_import_does_not_import_transformers():
    code = (
        "import sys, autobatch, autobatch.tasks.task, autobatch.tasks.causal_lm\n"
        "loaded = [m for m in ('transformers', 'peft', 'tokenizers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------
# tokenization: masking, BOS/EOS, truncation, dropping


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # llama's tokenizer adds BOS
def test_prompt_tokens_are_masked_and_completion_tokens_are_targets(
    request, tmp_path, arch, model_dir
):
    path = model_dir if arch == "gpt2" else request.getfixturevalue("llama_dir")
    rows = [{"prompt": "add: 1 + 2 =", "completion": " 3"}, {"text": "the cat sees the dog"}]
    task = causal_lm_task(
        model_dir=path, data=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_seq_len=64
    )
    tok = task.tokenizer
    bos = [tok.bos_token_id] if arch == "llama" else []
    prompt = bos + tok.encode("add: 1 + 2 =", add_special_tokens=False)
    completion = tok.encode(" 3", add_special_tokens=False) + [tok.eos_token_id]
    pc, text = task.dataset
    assert pc["input_ids"].tolist() == prompt + completion
    assert pc["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + completion
    assert item_count(pc) == len(completion)
    # a text line: every token is a target (a BOS, first, is never one after the shift)
    ids = bos + tok.encode("the cat sees the dog", add_special_tokens=False) + [tok.eos_token_id]
    assert text["input_ids"].tolist() == ids
    assert text["labels"].tolist() == [IGNORE_INDEX] * len(bos) + ids[len(bos) :]
    assert item_count(text) == len(ids) - 1
    assert task.count_items([0, 1]) == len(completion) + len(ids) - 1
    assert task.lengths([0, 1]) == [len(prompt + completion), len(ids)]


def test_truncation_keeps_the_first_max_seq_len_tokens(tmp_path, model_dir):
    text = "one two three four five six seven eight nine ten eleven twelve"
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": "a b"}])
    task = causal_lm_task(model_dir=model_dir, data=str(data), max_seq_len=8)
    full = task.tokenizer.encode(text, add_special_tokens=False)
    assert task.dataset[0]["input_ids"].tolist() == full[:8]
    assert item_count(task.dataset[0]) == 7
    assert task.truncated_samples == 1


def test_a_sample_with_no_target_left_is_dropped_and_counted(tmp_path, model_dir, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompt = "copy: red green blue\nanswer:"
    n = len(tok.encode(prompt, add_special_tokens=False))
    rows = [
        {"prompt": prompt, "completion": " red green blue"},
        {"text": "a red fish"},
        {"prompt": prompt, "completion": " x"},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    # the prompt fills max_seq_len: its first completion token would be at position n
    task = causal_lm_task(model_dir=model_dir, data=str(data), max_seq_len=n)
    assert (len(task.dataset), task.dropped_samples) == (1, 2)
    assert "dropped 2 of 3 samples" in caplog.text
    # one more position: the first completion token is the only target
    task = causal_lm_task(model_dir=model_dir, data=str(data), max_seq_len=n + 1)
    assert (len(task.dataset), task.dropped_samples) == (3, 0)
    assert item_count(task.dataset[0]) == item_count(task.dataset[2]) == 1


def test_max_samples_keeps_the_first_lines(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"word {i}"} for i in range(10)])
    task = causal_lm_task(model_dir=model_dir, data=str(data), max_seq_len=16, max_samples=4)
    assert len(task.dataset) == 4


# ---------------------------------------------------------------------------
# micro-batches and the loss


def test_collate_right_pads_with_the_pad_id_and_masks_pads_out():
    a = {"input_ids": torch.tensor([5, 6, 7, 8]), "labels": torch.tensor([-100, -100, 7, 8])}
    b = {"input_ids": torch.tensor([9, 10]), "labels": torch.tensor([9, 10])}
    batch = collate([a, b], pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 3, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_task_pads_with_the_tokenizers_pad_token(model_dir, data):
    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=32)
    batch = task.batch([0, 1])
    short = int(batch["attention_mask"].sum(1).argmin())
    pads = batch["input_ids"][short][batch["attention_mask"][short] == 0]
    assert pads.numel() > 0 and set(pads.tolist()) == {task.tokenizer.pad_token_id}


def test_loss_is_the_sum_of_target_token_cross_entropies(model_dir, data):
    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=32, dtype="float64")
    torch.manual_seed(0)
    model = task.build_model()
    loss = task.loss_fn(model, task.batch([0, 1]))
    # by hand: each sample alone (no padding), -log p(target) summed over its targets
    want = torch.zeros((), dtype=torch.float64)
    for s in task.dataset:
        logp = F.log_softmax(model(input_ids=s["input_ids"][None]).logits[0], dim=-1)
        for pos in range(1, len(s["labels"])):
            if s["labels"][pos] != IGNORE_INDEX:
                want -= logp[pos - 1, s["labels"][pos]]
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_worst_case_sample_fills_max_seq_len_with_targets(model_dir, data):
    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=24)
    sample = task.worst_case_sample()
    assert len(sample["input_ids"]) == 24 and item_count(sample) == 23
    batch = task.probe_batch(3)
    # one sequence a token short: the probe takes the padded (attention-mask) path
    assert batch["input_ids"].shape == (3, 24)
    assert batch["attention_mask"].sum(dim=1).tolist() == [24, 24, 23]
    assert bool(task.probe_batch(1)["attention_mask"].all())
    assert isinstance(task, Task)


# ---------------------------------------------------------------------------
# the model


def test_built_model_is_ready_to_train(model_dir, data):
    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=32, dtype="bfloat16")
    model = task.build_model()
    assert model.training and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.bfloat16
    loss = task.loss_fn(model, task.batch([0, 1]))
    assert loss.dtype == torch.float32  # computed in at least float32


def test_lora_trains_only_the_adapter(model_dir, data):
    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=32, lora={"r": 4})
    model = task.build_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_meta_device_build_has_the_same_fingerprint(model_dir, data):
    # the memory estimate and the profile cache build the model on 'meta' (shapes only)
    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=32, lora={"r": 4})
    with torch.device("meta"):
        meta = task.build_model()
    assert next(meta.parameters()).is_meta
    assert model_fingerprint(meta) == model_fingerprint(task.build_model())


def grads_of(model, batch, loss_fn) -> list[torch.Tensor]:
    loss_fn(model, batch).backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(model_dir, data, lora):
    kwargs = {"model_dir": model_dir, "data": data, "max_seq_len": 32, "dtype": "float64"}
    plain = causal_lm_task(**kwargs, lora=lora)
    ckpt = causal_lm_task(**kwargs, lora=lora, gradient_checkpointing=True)
    torch.manual_seed(0)
    a = plain.build_model()
    torch.manual_seed(0)
    b = ckpt.build_model()
    on = "is_activation_checkpointing"  # transformers 5; is_gradient_checkpointing before
    on = on if hasattr(a, on) else "is_gradient_checkpointing"
    assert getattr(b, on) and not getattr(a, on)
    batch = plain.batch([0, 1])
    for x, y in zip(grads_of(a, batch, plain.loss_fn), grads_of(b, batch, ckpt.loss_fn)):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-14)


def test_saved_lora_adapter_reloads_with_identical_logits(tmp_path, model_dir, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=32, lora={"r": 4})
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path / "adapter"
    task.save(model, str(out))
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # the adapter only, not the base weights
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    reloaded = PeftModel.from_pretrained(base, str(out), local_files_only=True).eval()
    batch = task.batch([0, 1])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, reloaded(**inputs).logits)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.encode("a red fish") == task.tokenizer.encode("a red fish")


def test_save_unwraps_ddp_and_writes_the_full_model(tmp_path, model_dir, data):
    from transformers import AutoModelForCausalLM

    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=32)
    model = task.build_model()

    class FakeDDP(DDP):  # isinstance(DDP) without a process group
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.module = module

    task.save(FakeDDP(model), str(tmp_path / "full"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full", local_files_only=True)
    for (n, p), q in zip(model.named_parameters(), reloaded.parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------------------
# example data and the CLI


def test_example_data_is_deterministic_and_long_tailed(tmp_path):
    a = make_example_jsonl(tmp_path / "a.jsonl", 400, seed=1)
    b = make_example_jsonl(tmp_path / "b.jsonl", 400, seed=1)
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert all(set(r) == {"prompt", "completion"} for r in rows)
    words = sorted(len((r["prompt"] + r["completion"]).split()) for r in rows)
    median, p99 = words[len(words) // 2], words[int(len(words) * 0.99)]
    assert p99 >= 4 * median  # a long tail: the few long samples set the memory
    text = make_example_jsonl(tmp_path / "t.jsonl", 5, kind="text")
    assert all(set(json.loads(line)) == {"text"} for line in text.read_text().splitlines())


def test_cli_writes_a_model_and_data_the_task_loads(tmp_path, capsys):
    assert main([str(tmp_path / "ex"), "--samples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "model" in printed and "data.jsonl" in printed and "task: causal_lm" in printed
    task = causal_lm_task(
        model_dir=str(tmp_path / "ex" / "model"),
        data=str(tmp_path / "ex" / "data.jsonl"),
        max_seq_len=128,
    )
    assert len(task.dataset) + task.dropped_samples == 50


# ---------------------------------------------------------------------------
# the full-batch gradient on ragged ranks (token-exact loss)

PLAN = [[3, 3, 2], [5], [1, 1, 1, 1]]  # 17 samples; rank 2 runs 4 micro-steps of one
N_SAMPLES = sum(map(sum, PLAN))
WORD_LIST = "a red green blue cat dog bird tree sun moon star river stone light"
WORDS = WORD_LIST.split()
# words per sample, very uneven and not sorted: 2 to 60 tokens (some truncated)
N_WORDS = [1, 8, 3, 12, 14, 2, 9, 1, 30, 5, 16, 35, 4, 10, 1, 45, 7]


def uneven_rows() -> list[dict]:
    rows = []
    for i, n in enumerate(N_WORDS):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))
        if i % 3 == 1:  # a prompt/completion sample: only the completion is a target
            rows.append({"prompt": f"copy: {words}\nanswer:", "completion": f" {words[:30]}"})
        else:
            rows.append({"text": words})
    return rows


SCENARIOS = {
    "float64": {"dtype": "float64"},
    "float32": {"dtype": "float32"},
    "lora-float32": {"dtype": "float32", "lora": {"r": 4}, "gradient_checkpointing": True},
}
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "lora-float32": 1e-5}


def build(model_dir: str, data: str, scenario: str):
    task = causal_lm_task(model_dir=model_dir, data=data, max_seq_len=60, **SCENARIOS[scenario])
    torch.manual_seed(0)  # as the worker does: the same weights (and LoRA init) on every rank
    model = task.build_model()
    with torch.no_grad():  # a trained adapter: with B = 0, A's gradient is exactly zero
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return task, model


class GradCapture(torch.optim.Optimizer):
    """An optimizer whose step records the (all-reduced) gradients and changes nothing."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.names = [n for n, _ in named_params]
        super().__init__([p for _, p in named_params], {})
        self.grads: dict[str, torch.Tensor] = {}

    def step(self, closure=None):  # noqa: ARG002
        params = self.param_groups[0]["params"]
        self.grads = {n: p.grad.detach().clone() for n, p in zip(self.names, params)}


def rank_grads(rank: int, world_size: int, model_dir: str, data: str) -> dict:
    assert world_size == len(PLAN)
    out = {}
    for scenario in SCENARIOS:
        task, model = build(model_dir, data, scenario)
        ddp = DDP(model)
        opt = GradCapture([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        acc = Accumulator(ddp, opt)
        start = sum(map(sum, PLAN[:rank]))
        micro_batches = []
        for size in PLAN[rank]:
            micro_batches.append(task.batch(range(start, start + size)))
            start += size
        result = acc.step(
            micro_batches, task.loss_fn, global_items=task.count_items(range(N_SAMPLES))
        )
        out[scenario] = {"grads": opt.grads, "loss": result.loss}
    return out


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> str:
    return str(write_jsonl(tmp_path_factory.mktemp("uneven") / "data.jsonl", uneven_rows()))


@pytest.fixture(scope="module")
def three_ranks(model_dir, uneven_data) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_ranks(rank_grads, len(PLAN), model_dir, uneven_data)


def test_uneven_data_is_what_the_exactness_test_needs(model_dir, uneven_data):
    task = causal_lm_task(model_dir=model_dir, data=uneven_data, max_seq_len=60)
    lengths = task.lengths(range(N_SAMPLES))
    assert len(task.dataset) == N_SAMPLES and task.dropped_samples == 0
    assert min(lengths) == 2 and max(lengths) == 60 and task.truncated_samples >= 1
    per_micro_batch, start = [], 0
    for size in (size for sizes in PLAN for size in sizes):
        per_micro_batch.append(task.count_items(range(start, start + size)))
        start += size
    # micro-batches carry from 1 to over 100 target tokens: a per-micro-batch mean would
    # weigh that one token as much as the hundred
    assert min(per_micro_batch) == 1 and max(per_micro_batch) > 100


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ragged_ranks_give_the_full_batch_token_mean_gradient(
    three_ranks, model_dir, uneven_data, scenario
):
    # reference: one process, all 17 samples padded together, sum of token CE / target tokens
    task, model = build(model_dir, uneven_data, scenario)
    n_items = task.count_items(range(N_SAMPLES))
    loss = task.loss_fn(model, task.batch(range(N_SAMPLES))) / n_items
    loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    if "lora" in scenario:
        assert all("lora_" in n for n in want)
    ref_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in want.values()))
    for rank, res in enumerate(three_ranks):
        got = res[scenario]["grads"]
        assert got.keys() == want.keys()
        diff = math.sqrt(sum(float((got[n] - want[n]).double().pow(2).sum()) for n in want))
        assert diff / ref_norm <= TOLERANCE[scenario], f"rank {rank}: rel err {diff / ref_norm:.3g}"
        assert res[scenario]["loss"] == pytest.approx(loss.item(), rel=TOLERANCE[scenario])


# ---------------------------------------------------------------------------
# the probe's worst case covers the micro-batches that length-aware packing makes


def test_packed_micro_batches_of_real_data_stay_under_the_probed_peak(tmp_path, model_dir):
    from autobatch.planning.packing import pack_global_batch, token_budgets
    from autobatch.planning.planner import make_plan
    from autobatch.planning.sampler import GlobalBatchSampler
    from autobatch.probe.devices import SimulatedDevice
    from autobatch.probe.profile import profile_model
    from autobatch.probe.simulated import TensorMemory

    data = make_example_jsonl(tmp_path / "data.jsonl", 300, kind="prompt_completion")
    task = causal_lm_task(model_dir=model_dir, data=str(data), max_seq_len=128, lora={"r": 4})

    def adamw(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    torch.manual_seed(0)
    profile = profile_model(
        task, SimulatedDevice("sim", 12 * 2**20), make_optimizer=adamw, headroom_fraction=0
    )
    plan = make_plan(32, [profile.capacity("d0")])
    model = task.build_model()
    sampler = GlobalBatchSampler(len(task.dataset), 32, seed=0)
    peaks = []
    for step in range(8):
        batch = sampler.global_batch(step)
        (micro,) = pack_global_batch(batch, task.lengths(batch), token_budgets(plan, 128))
        for mb in micro:
            memory = TensorMemory(None, model=model)
            with memory:
                task.loss_fn(model, task.batch(mb)).backward()
            model.zero_grad(set_to_none=True)
            peaks.append(memory.peak_bytes)
    # The forward+backward of every packed micro-batch (padded, uneven lengths) peaks below
    # what the probe predicts for a whole step at the largest micro-batch.
    assert max(peaks) <= profile.peak_bytes(profile.max_micro_batch)
