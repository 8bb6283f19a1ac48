"""peak(b): a device's peak memory as a function of the micro-batch size, as the max of lines.

The peak of a training step is the max over its moments of the live bytes, each
linear in b, so it is convex and piecewise linear. Measured steps (the profile)
and traced steps (the estimate) both describe it as a set of `PeakLine`s: the
micro-steps' lines, and the optimizer step's line (kept apart too: sharding
changes them differently, see `autobatch.planning.memory`).
"""

from __future__ import annotations

from autobatch.planning.memory import PeakLine, largest_under, peak_at
from autobatch.probe.measure import StepMeasurement

__all__ = ["PeakLine", "largest_under", "micro_lines", "optimizer_line", "peak_at", "peak_lines"]


def micro_lines(ok: list[StepMeasurement]) -> tuple[PeakLine, ...]:
    """The micro-steps' peak (forward + backward) = the max of these lines: the chords
    between measured sizes and the tangent at the largest one."""
    micro = sorted((m.micro_batch, m.micro_peak_bytes) for m in ok)
    lines = [PeakLine.through(p, q) for p, q in zip(micro, micro[1:])]
    top = max(ok, key=lambda m: m.micro_batch)
    if top.slope_bytes is not None:  # the tangent at the largest size
        slope = top.slope_bytes
        lines.append(PeakLine(top.micro_peak_bytes - slope * top.micro_batch, slope))
    if not lines:  # b = 1 alone: all of it per sample (pessimistic)
        lines.append(PeakLine(0.0, float(micro[0][1])))
    return tuple(lines)


def optimizer_line(ok: list[StepMeasurement]) -> PeakLine:
    """The optimizer step's peak: through its two largest measured sizes (flat from one)."""
    opt = sorted((m.micro_batch, m.optimizer_peak_bytes) for m in ok)
    return PeakLine.through(*opt[-2:]) if len(opt) > 1 else PeakLine(opt[0][1], 0.0)


def peak_lines(ok: list[StepMeasurement]) -> tuple[PeakLine, ...]:
    """peak(b) = the max of these lines, from measured steps (at least one)."""
    lines = (*micro_lines(ok), optimizer_line(ok))
    return tuple(dict.fromkeys(lines))  # without repeats
