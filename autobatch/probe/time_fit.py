"""The time line of a micro-step, t(b) = fixed_s + per_sample_s * b, fitted robustly, and
whether it can be trusted.

The points are one per measured micro-batch size: the median of its warm, timed
micro-steps (`autobatch.probe.measure`). The slope is Theil-Sen's (the median of the
slopes between every two sizes), the intercept the median of t - slope * b: one bad
point moves neither. Both are kept >= 0 (a micro-step cannot get faster with more
samples, nor take less than no time).

A fit is *trusted* when it had at least `MIN_SIZES` sizes, its slope came out >= 0,
and the median point lies within `MAX_MEDIAN_RESIDUAL` of the line. Otherwise the line
is still returned (the planner needs one) but `TimeFit.trusted` is False and `note` says
why in words; the profile carries it and the plan lists it in its notes. Untrusted
lines, by cause:

    one size measured   all of its time per sample (t / b): proportional
    negative slope      the median time of the sizes, per micro-step: constant
    poor fit            the robust line as fitted
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIN_SIZES = 3  # two sizes always lie on a line: a third is the first check of it
MAX_MEDIAN_RESIDUAL = 0.10  # the median point's distance from the line, relative to it


@dataclass(frozen=True)
class TimeFit:
    """A fitted time line per micro-step and whether to trust it (`note`: why not)."""

    fixed_s: float
    per_sample_s: float
    trusted: bool
    note: str = ""  # empty when trusted
    sizes: int = 0  # distinct micro-batch sizes it was fitted to

    def at(self, b: float) -> float:
        return self.fixed_s + self.per_sample_s * b


def fit_time_line(points: Sequence[tuple[int, float]]) -> TimeFit:
    """The time line through (micro-batch, seconds) points (see the module docstring)."""
    by_size: dict[int, list[float]] = {}
    for b, t in points:
        by_size.setdefault(int(b), []).append(float(t))
    if not by_size:
        raise ValueError("no timed micro-step to fit a time line to")
    xs = sorted(by_size)
    ts = [statistics.median(by_size[b]) for b in xs]
    if len(xs) == 1:
        b, t = xs[0], ts[0]
        return TimeFit(
            0.0,
            t / b,
            False,
            f"one size measured (b={b}): time taken as proportional to the micro-batch",
            1,
        )
    slopes = [
        (ts[j] - ts[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
    ]
    slope = statistics.median(slopes)
    if slope < 0:
        t = statistics.median(ts)
        return TimeFit(
            t,
            0.0,
            False,
            f"negative slope ({slope * 1e3:.3f} ms/sample over b={xs[0]}..{xs[-1]}): time did "
            f"not grow with the micro-batch (cold shapes timed, or noise); taken as constant "
            f"{t * 1e3:.3f} ms per micro-step",
            len(xs),
        )
    fixed = statistics.median(t - slope * b for b, t in zip(xs, ts))
    if fixed < 0:  # the line through the points passes below zero at b = 0: a ray from it
        fixed, slope = 0.0, sum(ts) / sum(xs)
    fit = TimeFit(fixed, slope, True, "", len(xs))
    residual = statistics.median(abs(t - fit.at(b)) / max(fit.at(b), 1e-12) for b, t in zip(xs, ts))
    if len(xs) < MIN_SIZES:
        return TimeFit(
            fixed,
            slope,
            False,
            f"too few sizes to check the line ({len(xs)}: b={', '.join(map(str, xs))})",
            len(xs),
        )
    if residual > MAX_MEDIAN_RESIDUAL:
        return TimeFit(
            fixed,
            slope,
            False,
            f"poor fit: the median size is {residual:.0%} off the line "
            f"(over b={xs[0]}..{xs[-1]}, {len(xs)} sizes)",
            len(xs),
        )
    return fit
