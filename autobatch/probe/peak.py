"""peak(b): a device's peak memory as a function of the micro-batch size, as the max of lines.

The peak of a training step is the max over its moments of the live bytes, each
linear in b, so it is convex and piecewise linear. Measured steps (the profile)
and traced steps (the estimate) both describe it as a set of `PeakLine`s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autobatch.probe.measure import StepMeasurement


@dataclass(frozen=True)
class PeakLine:
    """peak(b) = fixed_bytes + per_sample_bytes * b."""

    fixed_bytes: float
    per_sample_bytes: float

    def at(self, b: int) -> float:
        return self.fixed_bytes + self.per_sample_bytes * b

    def largest_under(self, budget: float, cap: int) -> int:
        """Largest b in [0, cap] with at(b) <= budget."""
        if self.per_sample_bytes <= 0:
            return cap if self.fixed_bytes <= budget else 0
        return max(0, min(cap, math.floor((budget - self.fixed_bytes) / self.per_sample_bytes)))

    @classmethod
    def through(cls, p: tuple[int, float], q: tuple[int, float]) -> PeakLine:
        (b1, p1), (b2, p2) = p, q
        slope = (p2 - p1) / (b2 - b1)
        return cls(p2 - slope * b2, slope)


def peak_lines(ok: list[StepMeasurement]) -> tuple[PeakLine, ...]:
    """peak(b) = the max of these lines, from measured steps (at least one)."""
    micro = sorted((m.micro_batch, m.micro_peak_bytes) for m in ok)
    lines = [PeakLine.through(p, q) for p, q in zip(micro, micro[1:])]
    top = max(ok, key=lambda m: m.micro_batch)
    if top.slope_bytes is not None:  # the tangent at the largest size
        slope = top.slope_bytes
        lines.append(PeakLine(top.micro_peak_bytes - slope * top.micro_batch, slope))
    if not lines:  # b = 1 alone: all of it per sample (pessimistic)
        lines.append(PeakLine(0.0, float(micro[0][1])))
    opt = sorted((m.micro_batch, m.optimizer_peak_bytes) for m in ok)
    lines.append(PeakLine.through(*opt[-2:]) if len(opt) > 1 else PeakLine(opt[0][1], 0.0))
    return tuple(dict.fromkeys(lines))  # without repeats


def largest_under(lines: tuple[PeakLine, ...], budget: float, cap: int) -> int:
    """Largest b in [0, cap] whose peak (the max of the lines) is within budget."""
    return min(line.largest_under(budget, cap) for line in lines)


def peak_at(lines: tuple[PeakLine, ...], b: int) -> int:
    return math.ceil(max(line.at(b) for line in lines))
