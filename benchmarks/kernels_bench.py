"""Benchmark af3trt.kernels on one CUDA device: decode GEMVs vs cuBLAS, and the log-mel front end.

    python benchmarks/kernels_bench.py --out DIR [--iters 50 --reps 20 --no-graph --sweep --quick]

1. Copy bandwidth: a large device-to-device copy, counted as bytes read + written (the
   bandwidth floor every GEMV below is compared with).
2. GEMVs on the Qwen2.5-7B decode shapes (qkv, o_proj, gate_up, down, lm_head) at M = 1 and 8:
   cuBLAS `F.linear` (bf16), `gemv_bf16`, `gemv_fp8` (per-tensor FP8 weights). Each call reads a
   different copy of the weight, enough copies to exceed 3x the L2 cache, as consecutive decoder
   layers do; otherwise the small matrices would be served from L2. Calls are timed in batches
   between CUDA events (optionally replayed from a CUDA graph, as a decode loop would run them),
   warm-up excluded; p50/p90 over batches, GB/s of bytes moved and % of the copy bandwidth.
   `--sweep` also times a grid of launch configs for the Triton kernels and reports the best.
3. Log-mel of 20 windows (10 min): LogMelSTFT "stft" (torch.stft) vs "dft" (conv1d basis) vs the
   reference `af3trt.features.log_mel`.

Returns (from `main`) and writes DIR/kernels_bench.json: environment, copy bandwidth, rows, errors.
A failing measurement is recorded in its row's "error" and the rest still run; the exit status is
1 when any row failed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from af3trt.features import log_mel as log_mel_reference
from af3trt.kernels import gemv as G
from af3trt.kernels.logmel import LogMelSTFT
from af3trt.spec import WINDOW_SAMPLES, WINDOW_SECONDS

QWEN25_7B_LAYERS = 28  # decoder layers: each runs qkv, o_proj, gate_up, down once per token
L2_FALLBACK_BYTES = 64 << 20
MS = (1, 8)


def environment() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    env = {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    for key, cmd in (
        ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        ("commit", ["git", "-C", str(REPO), "rev-parse", "HEAD"]),
    ):
        try:
            env[key] = (
                subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, subprocess.SubprocessError, IndexError):
            env[key] = None
    return env


def time_calls(calls, *, iters: int, reps: int, warmup: int, graph: bool) -> list[float]:
    """Milliseconds per call, one value per batch of `iters` calls (cycling through `calls`)."""
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()

    def batch():
        for i in range(iters):
            calls[i % len(calls)]()

    run = batch
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # capture needs its warm-up on a side stream
            batch()
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            batch()
        run = cuda_graph.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return times


def percentile(values: list[float], q: float) -> float:
    from af3trt.stats import percentile as one_definition

    return one_definition(values, q)


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = time_calls([lambda: dst.copy_(src)], iters=1, reps=max(reps, 5), warmup=3, graph=False)
    return 2 * nbytes / (percentile(times, 50) * 1e-3) / 1e9


def _copies(nbytes: int, l2_bytes: int) -> int:
    return max(1, min(64, math.ceil(3 * l2_bytes / nbytes)))


def _row(name, n, k, m, impl, times, moved_bytes, copy_gbps, **extra) -> dict:
    p50, p90 = percentile(times, 50), percentile(times, 90)
    gbps = moved_bytes / (p50 * 1e-3) / 1e9
    return {"shape": name, "N": n, "K": k, "M": m, "impl": impl, "ms_p50": p50, "ms_p90": p90,
            "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps, **extra}  # fmt: skip


def _impls(n: int, k: int, l2_bytes: int):
    """{impl: (call(x, copy index), weight bytes per call, check(x) -> (got, reference))}, copy
    counts, and the weight copies (bf16 and per-tensor FP8)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w_bf16 = [
        (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
        for _ in range(_copies(2 * n * k, l2_bytes))
    ]
    w_fp8 = [G.quantize_fp8_weight(w_bf16[i % len(w_bf16)]) for i in range(_copies(n * k, l2_bytes))]
    impls = {
        "cublas_bf16": (lambda x, i: F.linear(x, w_bf16[i % len(w_bf16)]), 2 * n * k,
                        lambda x: (F.linear(x, w_bf16[0]), G.gemv_bf16_reference(x, w_bf16[0]))),
        "triton_bf16": (lambda x, i: G.gemv_bf16(x, w_bf16[i % len(w_bf16)]), 2 * n * k,
                        lambda x: (G.gemv_bf16(x, w_bf16[0]), G.gemv_bf16_reference(x, w_bf16[0]))),
        "triton_fp8": (lambda x, i: G.gemv_fp8(x, *w_fp8[i % len(w_fp8)]), n * k,
                       lambda x: (G.gemv_fp8(x, *w_fp8[0]), G.gemv_fp8_reference(x, *w_fp8[0]))),
    }  # fmt: skip
    counts = {"cublas_bf16": len(w_bf16), "triton_bf16": len(w_bf16), "triton_fp8": len(w_fp8)}
    return impls, counts, w_bf16, w_fp8


def bench_gemv(args, copy_gbps: float, l2_bytes: int) -> list[dict]:
    rows = []
    for name, (n, k) in G.DECODE_SHAPES.items():
        impls, counts, w_bf16, w_fp8 = _impls(n, k, l2_bytes)
        for m in MS:
            x = torch.randn(m, k, device="cuda").bfloat16()
            for impl, (call, weight_bytes, check) in impls.items():
                try:
                    got, ref = check(x)
                    max_diff = (got.float() - ref.float()).abs().max().item()
                    calls = [lambda i=i, call=call, x=x: call(x, i) for i in range(counts[impl])]
                    times = time_calls(calls, iters=args.iters, reps=args.reps, warmup=args.warmup, graph=args.graph)
                    moved = weight_bytes + 2 * m * k + 2 * m * n
                    rows.append(
                        _row(
                            name,
                            n,
                            k,
                            m,
                            impl,
                            times,
                            moved,
                            copy_gbps,
                            max_diff_vs_reference=max_diff,
                            weight_copies=counts[impl],
                        )
                    )
                except Exception as exc:  # noqa: BLE001 - a benchmark records the failure, measures the rest
                    rows.append({"shape": name, "N": n, "K": k, "M": m, "impl": impl, "error": repr(exc)})
        if args.sweep:
            rows.extend(sweep_shape(name, n, k, w_bf16, w_fp8, args, copy_gbps))
        del impls, w_bf16, w_fp8
        torch.cuda.empty_cache()
    return rows


def _sweep_configs(n: int, k: int, fp8: bool, sms: int) -> list[G.GemvConfig]:
    block_k = 256 if fp8 else 128
    configs = []
    for block_n in (16, 32, 64, 128):
        for split_k in (1, 2, 4, 7, 8, 16):
            programs = math.ceil(n / block_n) * split_k
            if sms <= programs <= 32 * sms and k // split_k >= block_k:
                for num_warps in (4, 8):
                    configs.append(G.GemvConfig(block_n, block_k, split_k, num_warps=num_warps))
    return configs


def sweep_shape(name, n, k, w_bf16, w_fp8, args, copy_gbps) -> list[dict]:
    """Time each candidate config of both Triton kernels; rows marked impl 'sweep_*'."""
    rows = []
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    for fp8 in (False, True):
        for m in MS:
            x = torch.randn(m, k, device="cuda").bfloat16()
            for cfg in _sweep_configs(n, k, fp8, sms):
                if fp8:
                    calls = [
                        lambda i=i, c=cfg, x=x: G.gemv_fp8(x, *w_fp8[i % len(w_fp8)], config=c)
                        for i in range(len(w_fp8))
                    ]
                else:
                    calls = [
                        lambda i=i, c=cfg, x=x: G.gemv_bf16(x, w_bf16[i % len(w_bf16)], config=c)
                        for i in range(len(w_bf16))
                    ]
                impl = "sweep_fp8" if fp8 else "sweep_bf16"
                try:
                    times = time_calls(calls, iters=args.iters, reps=max(3, args.reps // 4), warmup=3, graph=args.graph)
                    moved = (1 if fp8 else 2) * n * k + 2 * m * (k + n)
                    rows.append(_row(name, n, k, m, impl, times, moved, copy_gbps, config=vars_of(cfg)))
                except Exception as exc:  # noqa: BLE001
                    rows.append(
                        {
                            "shape": name,
                            "N": n,
                            "K": k,
                            "M": m,
                            "impl": impl,
                            "config": vars_of(cfg),
                            "error": repr(exc),
                        }
                    )
    return rows


def vars_of(cfg: G.GemvConfig) -> dict:
    return {f: getattr(cfg, f) for f in ("block_n", "block_k", "split_k", "num_warps", "num_stages")}


def bench_log_mel(args) -> list[dict]:
    """Log-mel of `args.windows` random 30 s windows already on the device."""
    x = torch.randn(args.windows, WINDOW_SAMPLES, device="cuda") * 0.1
    audio_seconds = args.windows * WINDOW_SECONDS
    candidates = {
        "LogMelSTFT(stft)": LogMelSTFT("stft").cuda().eval(),
        "LogMelSTFT(dft)": LogMelSTFT("dft").cuda().eval(),
        "features.log_mel": lambda s: log_mel_reference(s, device="cuda"),
    }
    rows, outputs = [], {}
    with torch.inference_mode():
        for impl, fn in candidates.items():
            try:
                outputs[impl] = fn(x)
                times = time_calls(
                    [lambda fn=fn: fn(x)], iters=max(1, args.iters // 10), reps=args.reps, warmup=3, graph=False
                )
                p50 = percentile(times, 50)
                rows.append({"impl": impl, "windows": args.windows, "ms_p50": p50, "ms_p90": percentile(times, 90),
                             "real_time_factor": audio_seconds / (p50 * 1e-3)})  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                rows.append({"impl": impl, "windows": args.windows, "error": repr(exc)})
        ref = outputs.get("features.log_mel")
        for row in rows:
            if ref is not None and row["impl"] in outputs:
                row["max_diff_vs_reference"] = (outputs[row["impl"]] - ref).abs().max().item()
    return rows


def per_token_linears(rows: list[dict], copy_gbps: float) -> dict:
    """ms per decode token spent in the 28 x 4 layer linears + lm_head, per impl and M."""
    p50 = {
        (r["impl"], r["M"], r["shape"]): r["ms_p50"]
        for r in rows
        if "ms_p50" in r and not r["impl"].startswith("sweep")
    }
    out = {}
    for impl in ("cublas_bf16", "triton_bf16", "triton_fp8"):
        for m in MS:
            try:
                layer = sum(p50[(impl, m, s)] for s in ("qkv", "o_proj", "gate_up", "down"))
                total = QWEN25_7B_LAYERS * layer + p50[(impl, m, "lm_head")]
            except KeyError:
                continue
            bytes_per_weight = 1 if impl.endswith("fp8") else 2
            weights = QWEN25_7B_LAYERS * sum(n * k for s, (n, k) in G.DECODE_SHAPES.items() if s != "lm_head")
            weights += G.DECODE_SHAPES["lm_head"][0] * G.DECODE_SHAPES["lm_head"][1]
            floor_ms = bytes_per_weight * weights / (copy_gbps * 1e9) * 1e3
            out[f"{impl}_M{m}"] = {"ms": total, "floor_ms": floor_ms, "x_floor": total / floor_ms}
    return out


def best_sweep(rows: list[dict]) -> dict:
    best = {}
    for r in rows:
        if r["impl"].startswith("sweep") and "ms_p50" in r:
            key = f"{r['impl']}/{r['shape']}/M{r['M']}"
            if key not in best or r["ms_p50"] < best[key]["ms_p50"]:
                best[key] = {"ms_p50": r["ms_p50"], "pct_copy": r["pct_copy"], "config": r["config"]}
    return best


def print_report(result: dict) -> None:
    print(f"{result['env']['gpu']}: copy bandwidth {result['copy_bandwidth_gbps']:.0f} GB/s (read + write)")
    print(f"{'shape':9} {'M':>2} {'impl':12} {'p50 us':>9} {'p90 us':>9} {'GB/s':>7} {'% copy':>7} {'max diff':>9}")
    for r in result["gemv"]:
        if r["impl"].startswith("sweep"):
            continue
        if "error" in r:
            print(f"{r['shape']:9} {r['M']:>2} {r['impl']:12} ERROR {r['error']}")
            continue
        print(f'{r["shape"]:9} {r["M"]:>2} {r["impl"]:12} {r["ms_p50"] * 1e3:9.1f} {r["ms_p90"] * 1e3:9.1f} '
              f'{r["gbps"]:7.0f} {r["pct_copy"]:6.1f}% {r["max_diff_vs_reference"]:9.2e}')  # fmt: skip
    for key, v in result["per_token_linears"].items():
        print(f"linears per token {key}: {v['ms']:.3f} ms (floor {v['floor_ms']:.3f} ms, {v['x_floor']:.2f}x)")
    for key, v in result.get("sweep_best", {}).items():
        print(f"best {key}: {v['ms_p50'] * 1e3:.1f} us ({v['pct_copy']:.1f}% copy) {v['config']}")
    for r in result["log_mel"]:
        if "error" in r:
            print(f"log-mel {r['impl']}: ERROR {r['error']}")
        else:
            diff = r.get("max_diff_vs_reference", float("nan"))
            print(f'log-mel {r["impl"]} x{r["windows"]} windows: {r["ms_p50"]:.3f} ms p50, {r["ms_p90"]:.3f} ms p90, '
                  f'RTF {r["real_time_factor"]:.0f}, max diff vs reference {diff:.2e}')  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for kernels_bench.json")
    p.add_argument("--iters", type=int, default=50, help="calls per timed batch")
    p.add_argument("--reps", type=int, default=20, help="timed batches (p50/p90 over them)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (compiles the kernels)")
    p.add_argument(
        "--graph", action=argparse.BooleanOptionalAction, default=True, help="replay each batch from a CUDA graph"
    )
    p.add_argument("--windows", type=int, default=20, help="30 s windows for the log-mel benchmark")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth-probe copy")
    p.add_argument("--sweep", action="store_true", help="also time a grid of Triton launch configs per shape")
    p.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.reps, args.warmup, args.windows, args.copy_mib = 5, 3, 2, 2, 256
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_bench needs a CUDA device; torch.cuda.is_available() is False")
    env = environment()
    copy_gbps = copy_bandwidth(args.copy_mib << 20, args.reps)
    gemv_rows = bench_gemv(args, copy_gbps, env["l2_bytes"] or L2_FALLBACK_BYTES)
    result = {
        "env": env,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "copy_bandwidth_gbps": copy_gbps,
        "gemv": gemv_rows,
        "per_token_linears": per_token_linears(gemv_rows, copy_gbps),
        "sweep_best": best_sweep(gemv_rows),
        "log_mel": bench_log_mel(args),
    }
    result["errors"] = [r for r in result["gemv"] + result["log_mel"] if "error" in r]
    print_report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels_bench.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'kernels_bench.json'}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
