"""The equal-steps solver: the same number k of micro-steps on every rank.

Full sharding all-gathers in every forward, so every rank runs the same number k
of micro-steps: for each k, the shares k <= s_r <= k * m_r that sum to B and
minimise max_r(o_r + k * a_r + c_r * s_r) (a min-max of linear functions: the
continuous water level, then whole samples to the ranks that stay fastest). The
continuous optimum of every k at once (vectorised) bounds each k's step from
below; the k are solved in the order of their bounds until a bound passes the
best step found.

Pure values: imports numpy and planning's values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autobatch.planning.capacity import DeviceCapacity


def equal_accumulation_shares(
    global_batch_size: int, devices: Sequence[DeviceCapacity]
) -> tuple[int, np.ndarray] | None:
    """The same number k of micro-steps on every device, and each device's samples
    (k <= s_r <= k * max_micro_batch_r, summing to the global batch), minimising the
    slowest device's step time (ties: the fewest micro-steps); None when no k allows it.

    Each k's continuous optimum (all k at once) bounds its whole-sample optimum from
    below: the k are solved exactly in the order of those bounds, until the next
    bound is no better than the best step found."""
    B, W = global_batch_size, len(devices)
    m = np.array([d.max_micro_batch for d in devices], dtype=np.int64)
    a = np.array([d.fixed_s for d in devices], dtype=np.float64)
    c = np.array([d.per_sample_s for d in devices], dtype=np.float64)
    o = np.array([d.step_overhead_s for d in devices], dtype=np.float64)
    if m.min() < 1 or _ceil_div(B, int(m.sum())) > B // W:
        return None
    ks = np.arange(max(1, _ceil_div(B, int(m.sum()))), B // W + 1)
    bounds = np.concatenate(
        [_k_bounds(chunk, o, a, c, m, B) for chunk in np.array_split(ks, _chunks(len(ks), W))]
    )
    best_t, best = math.inf, None
    for i in np.argsort(bounds, kind="stable"):
        if bounds[i] * (1 - 1e-12) > best_t:
            break
        k = int(ks[i])
        s = min_max_shares(o + k * a, c, np.full(W, k), np.minimum(k * m, B), B)
        t = float(np.max(o + k * a + c * s))
        if t < best_t or (t == best_t and k < best[0]):
            best_t, best = t, (k, s)
    return best


def _chunks(n_ks: int, W: int) -> int:
    """Chunks of k for the bounds: about a million numbers each."""
    return max(1, n_ks * (2 * W + 1) * W // 2**20)


def _k_bounds(
    ks: np.ndarray, o: np.ndarray, a: np.ndarray, c: np.ndarray, m: np.ndarray, B: int
) -> np.ndarray:
    """For each k, the continuous optimum of the step time (a lower bound)."""
    base = o + ks[:, None] * a
    lower = np.broadcast_to(ks[:, None], base.shape)
    return _water_levels(base, c, lower, np.minimum(ks[:, None] * m, B), B)


def min_max_shares(
    base: np.ndarray, c: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int
) -> np.ndarray:
    """Integers lower <= s <= upper summing to `total` (within their sums) that
    minimise max(base + c * s), c >= 0.

    The continuous water level first (the time at which the clipped shares sum to
    `total`), its floor, then one sample at a time to the device whose time stays
    lowest: every sample so given has a time within the optimum, or the shares
    would already hold `total`."""
    level = float(_water_levels(base[None], c, lower[None], upper[None], total)[0])
    s = _most_within(level, base, c, lower, upper)
    while s.sum() < total:
        s[np.argmin(np.where(s < upper, base + c * (s + 1), np.inf))] += 1
    return _give_back(s, base, c, lower, int(s.sum()) - total)


def _most_within(
    T: float, base: np.ndarray, c: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    """The most each device takes within time T (at least its lower bound)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(c > 0, np.floor((T - base) / np.where(c > 0, c, 1.0)), upper)
    s = np.clip(s, lower, upper).astype(np.int64)
    for _ in range(3):  # floating-point rounding: the largest s with base + c*s <= T
        s = np.where((s > lower) & (base + c * s > T), s - 1, s)
    return np.where((s < upper) & (base + c * (s + 1) <= T), s + 1, s)


def _water_levels(
    base: np.ndarray, c: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int
) -> np.ndarray:
    """Per row (one problem each; `c` shared), the least time T at which the continuous
    shares clip((T - base) / c, lower, upper) sum to `total`, every device taking at
    least its lower bound (devices with c = 0 take their upper bound at no cost).

    The shares' sum is piecewise linear and rising in T, with breakpoints where a
    device reaches a bound: find the segment, interpolate."""
    forced = np.max(base + c * lower, axis=1)
    points = np.sort(np.concatenate([forced[:, None], base + c * lower, base + c * upper], 1), 1)
    points = np.maximum(points, forced[:, None])
    safe_c = np.where(c > 0, c, 1.0)
    shares = (points[:, :, None] - base[:, None, :]) / safe_c
    shares = np.clip(shares, lower[:, None], upper[:, None])
    amounts = np.where(c > 0, shares, upper[:, None]).sum(axis=2)
    rows = np.arange(len(points))
    reached = amounts >= total
    i = np.where(reached.any(axis=1), reached.argmax(axis=1), points.shape[1] - 1)  # rounding
    t1, v1 = points[rows, i], amounts[rows, i]
    t0, v0 = points[rows, np.maximum(i - 1, 0)], amounts[rows, np.maximum(i - 1, 0)]
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.where(v1 > v0, t0 + (total - v0) * (t1 - t0) / (v1 - v0), t1)
    return np.where(i == 0, forced, np.clip(level, t0, t1))


def _give_back(
    s: np.ndarray, base: np.ndarray, c: np.ndarray, lower: np.ndarray, surplus: int
) -> np.ndarray:
    """Remove `surplus` samples, one at a time from the slowest device, while that
    lowers the slowest time; then from anyone above its lower bound."""
    s = s.copy()
    while surplus > 0:
        t = base + c * s
        movable = (s > lower) & (c > 0)
        stuck = np.max(t[~movable], initial=-math.inf)
        if not movable.any() or np.max(t[movable]) <= stuck:
            for i in np.argsort(-t, kind="stable"):
                take = min(int(s[i] - lower[i]), surplus)
                s[i] -= take
                surplus -= take
            break
        i = int(np.argmax(np.where(movable, t, -math.inf)))
        s[i] -= 1
        surplus -= 1
    return s


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
