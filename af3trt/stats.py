"""The one percentile definition of af3trt's benchmarks, and the one device timer.

Linear interpolation between the closest ranks (numpy's default `percentile` method, "linear"):
p0 = the fastest sample, p100 = the slowest, so no percentile ever lies outside the samples.
(`statistics.quantiles`' default "exclusive" method extrapolates: with few samples its p90 lies above
the slowest one; nearest-rank methods jump between samples. Neither is used.)
"""

from __future__ import annotations

import math
import time
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


def summary(values: Sequence[float], scale: float = 1.0, keys: Sequence[str] | None = None) -> dict:
    """{"p50", "p90", "min", "max", "mean", "n"} of `values` times `scale` (only `keys`, in that order, if given)."""
    scaled = [float(v) * scale for v in values]
    out = {"p50": percentile(scaled, 50), "p90": percentile(scaled, 90), "min": min(scaled), "max": max(scaled),
           "mean": sum(scaled) / len(scaled), "n": len(scaled)}
    return out if keys is None else {k: out[k] for k in keys}


def device_times(fn, iters: int, warmup: int, device) -> list[float]:
    """Seconds per call of `fn` on `device` (a torch.device), warm-up calls excluded. On CUDA: events
    recorded back to back and read after one final sync (GPU time, launch gaps included); elsewhere
    perf_counter around each call. torch is imported only for a CUDA device."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    import torch

    torch.cuda.synchronize(device)
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in marks:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in marks]
