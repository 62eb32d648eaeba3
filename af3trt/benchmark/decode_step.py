"""Decode-step benchmark of `runtime.fast_decoder.FastTorchDecoder` at Qwen2.5-7B shapes, random weights.

`decode_step_benchmark(...) -> dict`: ms per CUDA-graph-captured step (eager off CUDA) against the
weight + KV bytes floor; `benchmark_matrix` runs {bf16, fp8} x batches. `python -m
af3trt.benchmark.decode_step --out decode.json` (GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from .. import dtypes
from ..runtime.fast_decoder import FastTorchDecoder
from ..runtime.fast_weights import FastWeights, random_fast_weights
from ..spec import ModelSpec, TextSpec
from ..stats import device_times, summary
from ..tiny import full_spec
from .floor import measure

__all__ = ["benchmark_matrix", "decode_step_benchmark", "main"]


def _percentiles(ms: list[float]) -> dict:
    return summary(ms, keys=("p50", "p90", "mean", "n"))


def _time_ms(fn, iters: int, warmup: int, device: torch.device) -> list[float]:
    """Per-call milliseconds, warm-up calls excluded (`af3trt.stats.device_times`)."""
    return [s * 1e3 for s in device_times(fn, iters, warmup, device)]


def _bench_spec(spec_or_full_size) -> TextSpec:
    if isinstance(spec_or_full_size, ModelSpec):
        return spec_or_full_size.text
    if isinstance(spec_or_full_size, TextSpec):
        return spec_or_full_size
    if spec_or_full_size in (None, True, "full"):
        return full_spec().text  # Qwen2.5-7B: 3584 / 18944 / 28 layers / 28:4 heads / 128 / 151672
    raise ValueError(f"expected a TextSpec, ModelSpec or 'full', got {spec_or_full_size!r}")


_BENCH_WEIGHTS: dict = {}  # one slot: the last random model, reused by calls with the same shapes


def _bench_weights(text: TextSpec, dtype, fp8: bool, device: torch.device) -> FastWeights:
    key = (text, dtype, fp8, device)
    if key not in _BENCH_WEIGHTS:
        _BENCH_WEIGHTS.clear()  # at most one full-size model (15 GB bf16) in memory
        gc.collect()  # earlier decoders hold their weights in a cycle (decoder -> graphs -> bound step)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _BENCH_WEIGHTS[key] = random_fast_weights(text, device, dtype, fp8)
    return _BENCH_WEIGHTS[key]


@torch.inference_mode()
def decode_step_benchmark(spec_or_full_size="full", batch: int = 1, kv_len: int = 1024, dtype=torch.bfloat16,
                          fp8: bool = False, iters: int = 100, *, warmup: int = 10, eager_iters: int = 10,
                          kernels: bool | None = None, hw: dict | None = None, device="cuda") -> dict:
    """ms per decode step of the CUDA-graph-captured step (eager off CUDA), random weights at the
    real Qwen2.5-7B shapes ("full") or a given TextSpec; returns a dict (STYLE rule 13).

    Every row attends `kv_len` keys (kv_len - 1 cached + the new one; a power of two >= 256 is
    attended exactly, else rounded up to its bucket). Also times the same step eagerly, and the
    floor: decode weight bytes (as stored: FP8 linears, bf16 lm_head) / measured copy bandwidth
    (`benchmark.floor.measure`; pass `hw` to reuse one), with and without the KV bytes read.
    kernels=False: cuBLAS linears (the baseline the GEMVs must beat).
    """
    device = torch.device(device)
    text = _bench_spec(spec_or_full_size)
    hw = hw or measure(device)
    weights = _bench_weights(text, dtype, fp8, device)
    dec = FastTorchDecoder(weights, device, max_batch=batch, max_seq=kv_len, kernels=kernels)
    dec._ensure_cache(batch, kv_len)
    dec._tokens.random_(0, text.vocab_size)
    dec._write.fill_(kv_len - 1)  # rows' start stays 0: all kv_len slots are live
    attended = dec.kv_bucket(kv_len)
    t0 = time.perf_counter()
    dec._runner(batch, attended)  # capture (after its warm-up) and one replay
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    capture_s = time.perf_counter() - t0
    step_ms = _percentiles(_time_ms(lambda: dec._runner(batch, attended), iters, warmup, device))
    eager_ms = _percentiles(_time_ms(lambda: dec._decode_step(batch, attended), eager_iters, 2, device))
    weight_bytes = weights.decode_bytes()
    kv_bytes = batch * kv_len * 2 * text.num_layers * text.num_kv_heads * text.head_dim * weights.embed.element_size()
    bandwidth = hw["copy_gbps"] * 1e9
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "batch": batch, "kv_len": kv_len, "attended_kv": attended, "dtype": dtypes.dtype(dtype).name,
        "fp8": fp8, "kernels": dec.kernels, "cuda_graph": dec.use_graphs,
        "shapes": {k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                 "num_kv_heads", "head_dim", "vocab_size")},
        "step_ms": step_ms, "eager_ms": eager_ms, "capture_s": capture_s,
        "weight_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9, "copy_gbps": hw["copy_gbps"],
        "floor_ms": weight_bytes / bandwidth * 1e3, "floor_ms_with_kv": (weight_bytes + kv_bytes) / bandwidth * 1e3,
    }
    out["step_over_floor"] = step_ms["p50"] / out["floor_ms_with_kv"]
    out["achieved_gbps"] = (weight_bytes + kv_bytes) / (step_ms["p50"] / 1e3) / 1e9
    return out


def benchmark_matrix(iters: int = 100, kv_len: int = 1024, batches=(1, 8), cublas_baseline: bool = True,
                     spec_or_full_size="full", device="cuda") -> list[dict]:
    """decode_step_benchmark over {bf16, fp8} x batches (+ bf16 with cuBLAS linears as the baseline),
    one random model in memory at a time, one bandwidth measurement for all rows."""
    hw = measure(device)
    rows = []
    for fp8 in (False, True):
        for batch in batches:
            for kernels in ((None, False) if cublas_baseline and not fp8 else (None,)):
                rows.append(decode_step_benchmark(spec_or_full_size, batch, kv_len, torch.bfloat16, fp8, iters,
                                                  kernels=kernels, hw=hw, device=device))
    _BENCH_WEIGHTS.clear()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="decode-step ms of FastTorchDecoder at Qwen2.5-7B shapes (GPU)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--kv-len", type=int, default=1024)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = benchmark_matrix(args.iters, args.kv_len)
    for r in rows:
        print(f"batch {r['batch']} fp8 {r['fp8']!s:5} kernels {r['kernels']!s:5}: {r['step_ms']['p50']:.3f} ms/step "
              f"(p90 {r['step_ms']['p90']:.3f}; eager {r['eager_ms']['p50']:.2f}; floor {r['floor_ms_with_kv']:.3f}, "
              f"x{r['step_over_floor']:.2f}; {r['achieved_gbps']:.0f} GB/s)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # python -m af3trt.benchmark.decode_step --out decode.json   (GPU)
    raise SystemExit(main())
