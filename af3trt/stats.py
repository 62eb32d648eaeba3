"""The one percentile definition of af3trt's benchmarks and timing helpers.

Linear interpolation between the closest ranks (numpy's default `percentile` method, "linear"):
p0 = the fastest sample, p100 = the slowest, so no percentile ever lies outside the samples.
(`statistics.quantiles`' default "exclusive" method extrapolates: with few samples its p90 lies above
the slowest one; nearest-rank methods jump between samples. Neither is used.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values` (at least one), linearly interpolated."""
    if not len(values):
        raise ValueError("expected at least one value for a percentile, got none")
    if not 0 <= q <= 100:
        raise ValueError(f"expected a percentile in [0, 100], got {q}")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float], scale: float = 1.0) -> dict:
    """{"p50", "p90", "min", "max", "mean", "n"} of `values` times `scale`."""
    scaled = [float(v) * scale for v in values]
    return {"p50": percentile(scaled, 50), "p90": percentile(scaled, 90), "min": min(scaled), "max": max(scaled),
            "mean": sum(scaled) / len(scaled), "n": len(scaled)}
