"""What a job trains, as the launcher, the probe and the accumulator see it.

A user's entrypoint (``package.module:function``) returns a `Task`. Everything
in it must be buildable on any worker: `build_model` is called once per rank
(after the seed is set, so every rank starts from the same weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from autobatch.errors import ProbeError
from autobatch.step.accumulate import LossFn


@dataclass(frozen=True)
class Task:
    build_model: Callable[[], nn.Module]
    dataset: Sequence[Any]
    collate: Callable[[list[Any]], Any]
    loss_fn: LossFn  # (model, batch) -> SUM of the per-item losses of the batch
    # The heaviest sample the job allows (longest sequence); the probe measures
    # micro-batches made of copies of it. Defaults to the dataset's first sample.
    worst_case_sample: Callable[[], Any] | None = None
    # Items one sample contributes to the loss (e.g. its target tokens); None
    # means one per sample. Lets every rank know N_global without a collective.
    item_count: Callable[[Any], int] | None = None
    # Tokens one sample occupies once collated (its sequence length). Set for
    # variable-length data: it turns on length-aware micro-batching (each rank
    # packs its share under a token budget) and the padding-waste metric.
    sample_length: Callable[[Any], int] | None = None
    # Turns on activation (gradient) checkpointing in a built model; the probe
    # uses it on a device where micro-batch 1 does not fit without it.
    enable_gradient_checkpointing: Callable[[nn.Module], None] | None = None
    # Writes the trained model to a directory (rank 0, after the last step),
    # e.g. a LoRA adapter and its tokenizer.
    save: Callable[[nn.Module, str], None] | None = None

    def probe_batch(self, size: int) -> Any:
        """A micro-batch of `size` worst-case samples."""
        sample = self.worst_case_sample() if self.worst_case_sample else self.dataset[0]
        return self.collate([sample] * size)

    def batch(self, indices: Sequence[int]) -> Any:
        return self.collate([self.dataset[int(i)] for i in indices])

    def lengths(self, indices: Sequence[int]) -> list[int]:
        """Sequence lengths of the samples at `indices` (requires `sample_length`)."""
        assert self.sample_length is not None
        return [self.sample_length(self.dataset[int(i)]) for i in indices]

    def max_length(self) -> int:
        """The longest sequence the job allows: the worst-case sample's length."""
        assert self.sample_length is not None
        if self.worst_case_sample is not None:
            return self.sample_length(self.worst_case_sample())
        return max(self.sample_length(s) for s in self.dataset)

    def checkpoint_activations(self, model: nn.Module) -> None:
        """Turns on gradient checkpointing in `model`, or says the task cannot."""
        if self.enable_gradient_checkpointing is None:
            raise ProbeError(
                "this task has no enable_gradient_checkpointing: gradient checkpointing "
                "cannot be turned on for it"
            )
        self.enable_gradient_checkpointing(model)

    def count_items(self, indices: Sequence[int]) -> int:
        """Loss items (samples or target tokens) of the samples at `indices`."""
        if self.item_count is None:
            return len(indices)
        return sum(self.item_count(self.dataset[int(i)]) for i in indices)


def model_fingerprint(model: nn.Module) -> str:
    """Identifies a model architecture for profile caching: class, shapes and dtypes."""
    import hashlib

    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    return h.hexdigest()[:16]
