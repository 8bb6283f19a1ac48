"""A tiny random causal LM and example data, for tests and the walkthrough in docs/jobs.md.

    python -m autobatch.tasks.lm_example OUT_DIR [--arch gpt2|llama] [--samples 2000]

writes OUT_DIR/model (random weights, a byte-level BPE tokenizer trained here on
a built-in text: nothing is downloaded) and OUT_DIR/data.jsonl (synthetic
copy / reverse / add tasks with long-tailed lengths), ready for the built-in
`causal_lm` task.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autobatch.errors import CausalLMError
from autobatch.tasks.hf_model import require_hf

SPECIAL_TOKEN = "<|endoftext|>"  # eos, bos and pad of the tiny tokenizer

_WORD_LIST = (
    "the a an one two three red green blue small big fast slow cat dog bird fish tree "
    "house river stone light dark day night sun moon star sky sea wind rain snow fire "
    "water earth city road car train boat book word sound song runs jumps sees finds "
    "makes takes gives holds reads writes opens closes and or but with from over under"
)
_WORDS = _WORD_LIST.split()
_TASKS = ("copy", "reverse", "add")
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model reads one token after another "
    "and learns to guess the next one. Copy the words, reverse the words, add the numbers. "
    "copy: reverse: add: answer: = + 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20\n"
    + " ".join(_WORDS)
)
ARCHS = ("gpt2", "llama")


def make_tiny_model_dir(
    path: str | Path,
    *,
    arch: str = "gpt2",
    vocab_size: int = 320,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 2,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Writes a tiny random-weight causal LM and a locally trained byte-level BPE tokenizer.

    `vocab_size` is at least 257: the 256 byte tokens and <|endoftext|> (eos, bos, pad).
    A "llama" tokenizer puts BOS in front of every text, as Llama's does; "gpt2" does not.
    """
    if arch not in ARCHS:
        raise CausalLMError(f"arch={arch!r} must be one of {', '.join(ARCHS)}")
    if vocab_size < 257:
        raise CausalLMError(f"vocab_size={vocab_size} must be >= 257 (256 bytes + {SPECIAL_TOKEN})")
    transformers = require_hf("transformers")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size, add_bos=arch == "llama", max_positions=max_positions)
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    ids = {"bos_token_id": special, "eos_token_id": special, "pad_token_id": special}
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=max_positions,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            resid_pdrop=0.0,  # no dropout: runs are deterministic, gradients comparable
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        model_cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=d_model,
            intermediate_size=4 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **ids,
        )
        model_cls = transformers.LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _train_tokenizer(vocab_size: int, *, add_bos: bool, max_positions: int) -> Any:
    tokenizers = require_hf("tokenizers")
    transformers = require_hf("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    examples = [_example(random.Random(i), 12) for i in range(200)]
    tok.train_from_iterator([_CORPUS] + [p + c for p, c in examples], trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{SPECIAL_TOKEN} $A",
            pair=f"{SPECIAL_TOKEN} $A $B",
            special_tokens=[(SPECIAL_TOKEN, tok.token_to_id(SPECIAL_TOKEN))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=max_positions,
    )


def _example(rng: random.Random, max_words: int) -> tuple[str, str]:
    """One synthetic (prompt, completion): copy or reverse words, or add numbers.

    The number of words is log-normal (median 6): mostly short, a long tail."""
    n = max(1, min(max_words, round(rng.lognormvariate(math.log(6), 0.9))))
    task = rng.choice(_TASKS)
    if task == "add":
        nums = [rng.randrange(20) for _ in range(n)]
        return f"add: {' + '.join(map(str, nums))} =", f" {sum(nums)}"
    words = [rng.choice(_WORDS) for _ in range(n)]
    answer = words if task == "copy" else words[::-1]
    return f"{task}: {' '.join(words)}\nanswer:", " " + " ".join(answer)


def make_example_jsonl(
    path: str | Path,
    n: int,
    *,
    seed: int = 0,
    kind: str = "prompt_completion",
    max_words: int = 64,
) -> Path:
    """Writes `n` synthetic samples (long-tailed lengths), deterministic by `seed`.

    kind="prompt_completion" writes {"prompt", "completion"} lines, kind="text" {"text"}."""
    if kind not in ("prompt_completion", "text"):
        raise CausalLMError(f"kind={kind!r} must be 'prompt_completion' or 'text'")
    if n < 1 or max_words < 1:
        raise CausalLMError(f"n={n} and max_words={max_words} must be >= 1")
    rng = random.Random(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(n):
            prompt, completion = _example(rng, max_words)
            row = (
                {"prompt": prompt, "completion": completion}
                if kind == "prompt_completion"
                else {"text": prompt + completion}
            )
            f.write(json.dumps(row) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m autobatch.tasks.lm_example",
        description="write a tiny random causal LM and a JSONL data set",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", choices=ARCHS, default="gpt2")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument(
        "--kind", choices=("prompt_completion", "text"), default="prompt_completion"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model_dir = make_tiny_model_dir(args.out_dir / "model", arch=args.arch, seed=args.seed)
        data = make_example_jsonl(
            args.out_dir / "data.jsonl", args.samples, seed=args.seed, kind=args.kind
        )
    except CausalLMError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {model_dir}/ (tiny random {args.arch}, tokenizer included)")
    print(f"wrote {data} ({args.samples} {args.kind} samples)")
    print("use them in a job spec (see configs/causal-lm-lora.yaml):")
    print("  task: causal_lm")
    print("  max_seq_len: 256")
    print(f"  task_args: {{model_dir: {model_dir.resolve()}, data: {data.resolve()}}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
