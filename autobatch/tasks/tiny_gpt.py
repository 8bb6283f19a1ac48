"""A tiny GPT and a synthetic language-modelling data set: the built-in demo task.

Everything is generated locally from a seed (no download). The data is a
noisy repeating-pattern language, so the loss visibly falls within a few
hundred steps on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autobatch.tasks.losses import next_token_loss_sum
from autobatch.tasks.task import Task


@dataclass(frozen=True)
class TinyGPTConfig:
    vocab_size: int = 64
    seq_len: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        # No attention biases: a key bias has a zero gradient in exact arithmetic
        # (softmax ignores a shift), so Adam would turn its rounding noise into
        # full-size steps and runs on different device mixes would drift apart.
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, bias=False, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        d = cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyGPTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or TinyGPTConfig()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.checkpoint_blocks = False  # recompute each block's activations in backward

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), diagonal=1)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.head(self.ln_f(x))


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing for a TinyGPT (or a DDP around one)."""
    getattr(model, "module", model).checkpoint_blocks = True


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over the target tokens (labels != -100)."""
    return next_token_loss_sum(model(batch["input_ids"]), batch["labels"])


def synthetic_corpus(n: int, cfg: TinyGPTConfig, *, seed: int = 0) -> list[torch.Tensor]:
    """`n` sequences of a noisy periodic language: token t+period repeats token t."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        period = int(torch.randint(2, 6, (1,), generator=g))
        motif = torch.randint(0, cfg.vocab_size, (period,), generator=g)
        seq = motif.repeat(cfg.seq_len // period + 1)[: cfg.seq_len].clone()
        noise = torch.rand(cfg.seq_len, generator=g) < 0.05
        seq[noise] = torch.randint(0, cfg.vocab_size, (int(noise.sum()),), generator=g)
        seqs.append(seq)
    return seqs


def collate_fixed(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    tokens = torch.stack(samples)
    return {"input_ids": tokens, "labels": tokens.clone()}


def tiny_gpt_task(
    *, dataset_size: int = 4096, seed: int = 0, cfg: TinyGPTConfig | None = None, **sizes: int
) -> Task:
    """The demo task: the tiny GPT on the synthetic corpus, per-token loss.

    `sizes` override fields of TinyGPTConfig (vocab_size, seq_len, d_model, n_heads, n_layers).
    """
    cfg = cfg or TinyGPTConfig()
    unknown = set(sizes) - set(TinyGPTConfig.__dataclass_fields__)
    if unknown:
        allowed = ", ".join(["dataset_size", *TinyGPTConfig.__dataclass_fields__])
        raise TypeError(f"unknown tiny_gpt argument(s) {sorted(unknown)}; allowed: {allowed}")
    cfg = TinyGPTConfig(**{**cfg.__dict__, **sizes})
    return Task(
        build_model=lambda: TinyGPT(cfg),
        dataset=synthetic_corpus(dataset_size, cfg, seed=seed),
        collate=collate_fixed,
        loss_fn=token_loss_sum,
        item_count=lambda seq: len(seq) - 1,  # every token but the first is a target
        enable_gradient_checkpointing=checkpoint_blocks,
    )
