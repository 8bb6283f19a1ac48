"""LoRA settings: one schema, used by the job spec and by the causal-LM task."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autobatch.errors import LoraError, format_validation_error


class LoraSpec(BaseModel):
    """A LoRA adapter's settings (PEFT's LoraConfig: r, lora_alpha, lora_dropout,
    target_modules)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: Annotated[int, Field(ge=1, le=1024, strict=True)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # None: PEFT's default for the architecture
    target_modules: str | Annotated[list[str], Field(min_length=1)] | None = None


def lora_settings(lora: LoraSpec | dict[str, Any] | None) -> LoraSpec | None:
    """`lora` validated (defaults filled in), or None; errors name the key and the value."""
    if lora is None or isinstance(lora, LoraSpec):
        return lora
    if not isinstance(lora, dict):
        keys = ", ".join(LoraSpec.model_fields)
        raise LoraError(f"lora={lora!r} must be a mapping with keys {keys}")
    try:
        return LoraSpec.model_validate(lora)
    except ValidationError as exc:
        raise LoraError(format_validation_error(exc, prefix="lora")) from None
