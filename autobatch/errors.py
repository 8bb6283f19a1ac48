"""Every error the library raises on purpose (the launcher's are in `launcher.errors`).

    AutobatchError
    ├── PlanError(ValueError)      the planner got an input it cannot satisfy
    ├── SamplerError(ValueError)   the sampler's dataset/batch/state is inconsistent
    ├── ProbeError                 a device or model could not be measured
    │   ├── DeviceSpecError(ValueError)  a device list or memory size does not parse
    │   └── NoFitError             not even one sample fits the device
    ├── CausalLMError(ValueError)  the causal-LM task's model, data or settings are unusable
    ├── LoraError(ValueError)      LoRA settings with an unknown key or a bad value
    ├── StorageError               a write found no space, no permission, or no reachable
    │                              file system (the message names the path and what is missing)
    └── LaunchError                the launcher could not start or keep a job

Messages name the field, the value and what is allowed, so a user can fix the
input without reading code. A third-party error becomes one of these where it
crosses into the library, with the cause kept (`raise ... from exc`) when it
tells the user more than the message does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class AutobatchError(Exception):
    """Base of every error autobatch raises on purpose."""


class PlanError(AutobatchError, ValueError):
    """The planner was given inputs no plan can satisfy."""


class SamplerError(AutobatchError, ValueError):
    """The sampler was given an inconsistent dataset size, batch or state."""


class ProbeError(AutobatchError):
    """A device could not be inventoried or the model could not be measured on it."""


class DeviceSpecError(ProbeError, ValueError):
    """A device list, simulated device or memory size could not be parsed."""


class NoFitError(ProbeError):
    """Not even one sample fits the device's budget (after `measured_steps` steps)."""

    def __init__(self, message: str, *, measured_steps: int) -> None:
        super().__init__(message)
        self.measured_steps = measured_steps

    def __reduce__(self) -> tuple:
        # Pickled across processes (a Ray worker's error reaches the driver as its cause):
        # the keyword-only argument must travel too, or unpickling fails.
        return (_no_fit, (str(self), self.measured_steps))


def _no_fit(message: str, measured_steps: int) -> NoFitError:
    return NoFitError(message, measured_steps=measured_steps)


class CausalLMError(AutobatchError, ValueError):
    """The causal-LM task's model directory, data file or settings are unusable."""


class LoraError(AutobatchError, ValueError):
    """LoRA settings that are not a mapping of known keys with allowed values."""


class StorageError(AutobatchError):
    """A write failed for want of storage: no space left, no permission, a read-only or an
    unreachable file system. `path` is where it wrote; the message says what is missing
    ("no space left on <path>"). A restart would fail the same way."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message, path)  # both in args: it pickles across processes whole
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0])


class LaunchError(AutobatchError):
    """The launcher could not start, run or recover a job."""


def format_validation_error(exc: ValidationError, *, prefix: str = "") -> str:
    """pydantic's errors as one line per problem: 'field.path: message (got value)'."""
    lines = []
    for err in exc.errors():
        path = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]]) or "(spec)"
        msg = err["msg"].removeprefix("Value error, ")
        got = (
            ""
            if err["type"] == "missing" or isinstance(err.get("input"), dict)
            else (f" (got {err.get('input')!r})")
        )
        lines.append(f"{path}: {msg}{got}")
    return "; ".join(lines)
