"""The what-if's answer as values: the levers of one row, the job it is for, each row's
outcome, and the whole table with its text (`autobatch.probe.whatif` computes them).

    Levers     one combination: precision, LoRA, checkpointing, sharding
    LMJob      what of a job the what-if needs, as plain values
    DeviceFit  one device type under one combination: its micro-batch, needs and has
    Outcome    one combination's plan, or why there is none
    WhatIf     every combination, the job's own and the fastest, as rows, lines and JSON
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from autobatch.levers import Sharding
from autobatch.planning.plan import Plan, size_text
from autobatch.probe.estimate import GPU_OVERHEAD_BYTES
from autobatch.probe.measure import MakeOptimizer
from autobatch.step.precision import Precision
from autobatch.tasks.lora import LoraSpec


@dataclass(frozen=True)
class Levers:
    """One combination of what a job can change to fit its devices."""

    precision: Precision
    lora: bool
    gradient_checkpointing: bool
    sharding: Sharding

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def text(self) -> str:
        lora = "LoRA" if self.lora else "no LoRA"
        ckpt = "checkpointing" if self.gradient_checkpointing else "no checkpointing"
        return f"{self.precision}, {lora}, {ckpt}, sharding {self.sharding}"


@dataclass(frozen=True)
class LMJob:
    """What of a job the what-if needs, as plain values (the launcher reads them from a spec).

    `lora` is the adapter the LoRA rows train; `own_*` the job's own levers ("auto"
    resolved as the launcher resolves it: `choose_precision`, `choose_sharding`)."""

    model_dir: str
    max_seq_len: int
    global_batch_size: int
    make_optimizer: MakeOptimizer
    lora: LoraSpec = LoraSpec()
    dtype: str = "float32"
    headroom_fraction: float = 0.05
    keep_all: bool = False
    own_precision: Precision | Literal["auto"] = "fp32"
    own_lora: bool = False
    own_gradient_checkpointing: bool = False
    own_sharding: Sharding | Literal["auto"] = "none"


@dataclass(frozen=True)
class DeviceFit:
    """One device type under one combination, at the world size it was planned for."""

    name: str
    count: int
    max_micro_batch: int
    needs_bytes: int  # the peak of a training step at micro-batch 1, on one rank
    has_bytes: int  # its budget: what that peak must stay within

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class Outcome:
    """One combination of levers: its plan, or why there is none."""

    levers: Levers
    devices: tuple[DeviceFit, ...]
    plan: Plan | None
    problem: str | None = None

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def samples_per_s(self) -> float | None:
        return self.plan.predicted_samples_per_s if self.plan else None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.levers.to_dict(),
            "fits": self.fits,
            "devices": [d.to_dict() for d in self.devices],
            "world_size": self.plan.world_size if self.plan else None,
            "step_time_s": self.plan.predicted_step_time_s if self.plan else None,
            "samples_per_s": self.samples_per_s,
            "state_shares": self._state_shares(),
            "problem": self.problem,
        }

    def _state_shares(self) -> list[float] | None:
        """Under "proportional", each rank's part of the trainable state, in rank order."""
        slices = self.plan.state_slices if self.plan else None
        return [s / sum(slices) for s in slices] if slices else None


@dataclass(frozen=True)
class WhatIf:
    """Every combination of levers for one model, job and device list."""

    model: str
    devices: tuple[str, ...]  # one GPU name per device
    global_batch_size: int
    max_seq_len: int
    outcomes: tuple[Outcome, ...]
    own: Levers | None  # the job's own combination (None: not in the table)
    notes: tuple[str, ...] = ()

    def fastest(self) -> Outcome | None:
        """The combination with the most samples/s among those that fit (None: none fits)."""
        fits = [o for o in self.outcomes if o.fits]
        return max(fits, key=lambda o: o.samples_per_s or 0.0) if fits else None

    def own_outcome(self) -> Outcome | None:
        return next((o for o in self.outcomes if o.levers == self.own), None)

    def only_with(self) -> dict[Sharding, list[Levers]]:
        """Per sharding mode, the combinations that fit with it and with no other mode."""
        only: dict[Sharding, list[Levers]] = {}
        for o in self.outcomes:
            lv = o.levers
            same = [p for p in self.outcomes if replace(p.levers, sharding=lv.sharding) == lv]
            if o.fits and not any(p.fits for p in same if p is not o):
                only.setdefault(lv.sharding, []).append(lv)
        return only

    def device_types(self) -> list[tuple[str, int]]:
        names = list(dict.fromkeys(self.devices))
        return [(n, self.devices.count(n)) for n in names]

    def table_rows(self) -> list[dict[str, str]]:
        """One row of display strings per combination (for the text and rich tables)."""
        fastest = self.fastest()
        rows = []
        for o in self.outcomes:
            marks = [
                m
                for m, is_it in (("spec", o is self.own_outcome()), ("fastest", o is fastest))
                if is_it
            ]
            row = {
                "": ", ".join(marks),
                "precision": o.levers.precision,
                "LoRA": "yes" if o.levers.lora else "no",
                "ckpt": "yes" if o.levers.gradient_checkpointing else "no",
                "sharding": o.levers.sharding,
            }
            for d in o.devices:
                row[f"{d.name} x{d.count}"] = str(d.max_micro_batch) if d.max_micro_batch else "-"
            row["ranks"] = f"{o.plan.world_size}/{len(self.devices)}" if o.plan else "-"
            row["samples/s"] = f"{o.samples_per_s:,.2f}" if o.plan else "-"
            row["why not"] = o.problem or ""
            rows.append(row)
        return rows

    def summary_lines(self) -> list[str]:
        lines = []
        own, fastest = self.own_outcome(), self.fastest()
        if own is not None:
            result = f"{own.samples_per_s:,.2f} samples/s" if own.fits else own.problem
            lines.append(f"spec ({own.levers.text()}): {result}")
        if fastest is None:
            lines.append("no combination fits every device: add or change devices")
        else:
            lines.append(
                f"fastest that fits ({fastest.levers.text()}): {fastest.samples_per_s:,.2f} "
                f"samples/s on {fastest.plan.world_size} of {len(self.devices)} devices"
            )
        for mode, levers in self.only_with().items():
            which = "; ".join(lv.text().rsplit(", sharding", 1)[0] for lv in levers)
            lines.append(f"fits only with sharding {mode}: {which}")
        lines.append(
            "samples/s leave communication out: DDP's all-reduce, FSDP's all-gathers and "
            "reduce-scatters (every forward and backward with sharding full), proportional's "
            "broadcasts and reduces (every micro-step)"
        )
        lines.append(
            "micro-batch columns: the largest micro-batch per device type ('-': one sample "
            "does not fit; under proportional, at the type's planned share of the state, or "
            "with none where no plan fits); needs: a training step's peak at micro-batch 1 on "
            "one rank; has: "
            f"the GPU's memory less the headroom, {size_text(GPU_OVERHEAD_BYTES)} for the CUDA "
            "context and workspaces, and the process group's buffers"
        )
        return lines + list(self.notes)

    def to_dict(self) -> dict[str, Any]:
        fastest = self.fastest()
        return {
            "model": self.model,
            "devices": list(self.devices),
            "global_batch_size": self.global_batch_size,
            "max_seq_len": self.max_seq_len,
            "own": self.own.to_dict() if self.own else None,
            "fastest": fastest.levers.to_dict() if fastest else None,
            "only_with": {m: [lv.to_dict() for lv in lvs] for m, lvs in self.only_with().items()},
            "rows": [
                {**o.to_dict(), "own": o.levers == self.own, "fastest": o is fastest}
                for o in self.outcomes
            ],
            "notes": list(self.notes),
            "estimated": True,
        }
