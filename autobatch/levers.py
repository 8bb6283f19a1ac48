"""The memory levers' names and their validation, defined once for the whole project.

A memory lever is a way for a rank to hold a model in less device memory than a
full replica, paid for in communication or compute. Each lever is a name here, one
term in the memory model (`autobatch.planning.memory`), a wrapping of the model
(`autobatch.step`) and a field of the job spec; docs/levers.md walks through them.

    sharding   how the ranks hold parameters, gradients and optimizer state
               "none"       a full replica per rank (DDP)
               "optimizer"  FSDP2: optimizer state and reduced gradients sharded;
                            ranks may run different numbers of micro-steps
               "full"       FSDP2: parameters, gradients and optimizer state sharded;
                            every rank runs the same number of micro-steps
               "proportional"  each rank owns a contiguous slice, of a planned size, of
                            the flat trainable state; whole parameters gathered at every
                            micro-step; every rank runs the same number of micro-steps
               "auto"       (a choice, not a mode) the lightest mode that fits every device

The planner, the step and the launcher's spec all read these names: this module is
on the library's ground floor and imports autobatch.errors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from autobatch.errors import PlanError

Sharding = Literal["none", "optimizer", "full", "proportional"]
SHARDINGS: tuple[Sharding, ...] = get_args(Sharding)  # lightest first
ShardMode = Literal["optimizer", "full"]  # the modes that shard (FSDP2)
SHARD_MODES: tuple[ShardMode, ...] = get_args(ShardMode)
ShardingChoice = Literal[Sharding, "auto"]  # what a user may ask for
SHARDING_CHOICES: tuple[str, ...] = (*SHARDINGS, "auto")


def check_name(field: str, value: object, allowed: Sequence[str]) -> str:
    """`value` if it is one of `allowed`, else a PlanError naming the field, the value
    and the choices: "sharding='zero2' must be one of 'none', 'optimizer', 'full'"."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(name) for name in allowed)
        raise PlanError(f"{field}={value!r} must be one of {choices}")
    return value


def check_sharding(value: object, *, field: str = "sharding") -> Sharding:
    """`value` if it names a sharding mode ("none", "optimizer", "full", "proportional")."""
    return check_name(field, value, SHARDINGS)  # type: ignore[return-value]


def check_shard_mode(value: object, *, field: str = "mode") -> ShardMode:
    """`value` if it names a mode that shards ("optimizer", "full")."""
    return check_name(field, value, SHARD_MODES)  # type: ignore[return-value]


def check_sharding_choice(value: object, *, field: str = "sharding") -> ShardingChoice:
    """`value` if it names a sharding mode or "auto"."""
    return check_name(field, value, SHARDING_CHOICES)  # type: ignore[return-value]
