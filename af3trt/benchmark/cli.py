"""AF3 latency: backends x audio lengths x batch sizes -> JSON + markdown + PNG (see benchmarks/README.md).

    af3trt bench --model tiny --backends hf,torch --audio-seconds 10,30 --batch 1 --out results.json
    af3trt bench --random-weights --backends hf,torch --audio-seconds 30,600 --batch 1,8 --out gpu.json
    af3trt bench --backends triton --triton-url 127.0.0.1:8000 --triton-grpc-url 127.0.0.1:8001 --out triton.json
    af3trt bench --floor-only --out floor.json
    af3trt bench --host-overhead --batch 1,8 --new-tokens 256 --out host.json   # token-loop overhead per step (CPU)

`python benchmarks/latency.py ARGS` is the same command (it calls `main` here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from . import LatencyConfig, floor_record, run_latency, write_report
from .backends import BACKENDS
from .latency import add_ratios
from .report import markdown, write_json


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' or an AF3 checkpoint dir (ignored with --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="full-size AF3 shapes, random weights, no checkpoint")
    p.add_argument("--scale", type=float, default=1.0, help="shrink the random model (tests); 1 = real size")
    p.add_argument("--backends", default="hf,torch", help=f"comma list from {sorted(BACKENDS)}")
    p.add_argument("--audio-seconds", type=_floats, default=(30.0,), help="comma list, each <= 600")
    p.add_argument("--batch", type=_ints, default=(1,), help="comma list of batch sizes (one generate call each)")
    p.add_argument("--new-tokens", type=int, default=32, help="fixed output length (min = max new tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before each row's timed ones, on that row's own backend, audio length and batch")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32 (CPU default)")
    p.add_argument("--engine-dir", default=None, help="engine dir for the trtllm backend")
    p.add_argument("--triton-url", default=None, help="host:port of a Triton server's HTTP endpoint (triton backend)")
    p.add_argument("--triton-grpc-url", default=None,
                   help="host:port of its gRPC endpoint (default: the HTTP host, port + 1)")
    p.add_argument("--triton-model", default="af3", help="af3 (streams text pieces) or ensemble")
    p.add_argument("--budget-s", type=float, default=None, help="skip rows once this many seconds have passed")
    p.add_argument("--no-floor", action="store_true", help="do not measure bandwidth / matmul rate")
    p.add_argument("--floor-only", action="store_true", help="only measure the floors (+ environment)")
    p.add_argument("--report-from", metavar="JSON", help="only rebuild the markdown + PNGs of a results JSON")
    p.add_argument("--host-overhead", action="store_true",
                   help="only the token loop's host time per decode step (generate minus the decoder's step calls), "
                        "--model on CPU at each --batch, without and with one stop string (af3trt/benchmark/host_overhead.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results JSON; .md and _latency.png / _decode.png go beside it")
    return p


def _config(args) -> LatencyConfig:
    return LatencyConfig(backends=tuple(b for b in args.backends.split(",") if b), audio_seconds=args.audio_seconds,
                         batches=args.batch, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                         model=args.model, random_weights=args.random_weights, scale=args.scale, device=args.device,
                         dtype=args.dtype, engine_dir=args.engine_dir, triton_url=args.triton_url,
                         triton_grpc_url=args.triton_grpc_url, triton_model=args.triton_model,
                         budget_s=args.budget_s, measure_floor=not args.no_floor, seed=args.seed)


def _progress(out: str):
    """on_update callback: rewrite the JSON + markdown, print each new row's status."""
    shown = [0]

    def progress(result):
        write_json(result, out)
        Path(out).with_suffix(".md").write_text(markdown(result))
        if len(result["results"]) > shown[0]:
            shown[0] = len(result["results"])
            r = result["results"][-1]
            print(f"[{len(result['results'])}] {r['backend']} {r['audio_seconds']:g} s x {r['batch']}: {r['status']}",
                  flush=True)

    return progress


def main(argv=None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.report_from:
        result = json.loads(Path(args.report_from).read_text())
        add_ratios(result["results"])  # a killed run stopped before computing them
        print(json.dumps(write_report(result, args.out)))
        return 0
    if args.host_overhead:
        from .host_overhead import main as host_overhead

        return host_overhead(["--model", args.model, "--batch", ",".join(str(b) for b in args.batch),
                              "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--out", args.out])
    if args.floor_only:
        record = floor_record(args.device)
        write_json(record, args.out)
        print(json.dumps(record["hardware"], indent=2))
        return 0
    try:
        cfg = _config(args)
        result = run_latency(cfg, on_update=_progress(args.out))
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    paths = write_report(result, args.out)
    print(markdown(result))
    print(json.dumps(paths))
    return 0
