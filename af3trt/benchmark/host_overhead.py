"""Host overhead of the token loop per decode step: the time `Pipeline.generate` spends in its decode
phase outside the decoder's step calls (embedding, mask, forward and logits of each step), per token.

    af3trt bench --host-overhead --out results/host_overhead.json      # tiny model, CPU, batch 1 and 8

Measured at a fixed output length (greedy, no repetition penalty), without stop strings and with
one stop string that never matches (so it is checked every step). The length is fixed with
min_new_tokens = max_new_tokens (a processor masking the eos ids every step; what older checkouts
have) and, where the checkout has it, also with ignore_eos (no processor at all: the loop alone).
Only public APIs that earlier af3trt versions share are used (`Pipeline.from_pretrained`,
`generate(..., max_new_tokens, min_new_tokens, do_sample, repetition_penalty, stop)`,
so the same file measures an older checkout: run it with that checkout first on
PYTHONPATH (`PYTHONPATH=OLD python af3trt/benchmark/host_overhead.py --out before.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import af3trt
from af3trt.audio import synthetic_audio
from af3trt.runtime import Pipeline

NEVER = "\u2407never\u2407"  # a stop string the tiny model does not produce: checked at every step


class StepClock:
    """Time inside the decoder's step calls: the `advance(next_ids, step)` callback the torch token
    loop calls per decode step (embedding, attention mask, forward, logits). af3trt >= the
    generation core reports it itself (`timings["decode_host_per_step"]`); for an older checkout
    its `runtime.sampling.decode_loop` is wrapped here to time `advance` the same way."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0
        try:  # an older checkout's token loop (absent from this one)
            old = importlib.import_module("af3trt.runtime.sampling")
        except ImportError:
            self.builtin = True
            return
        self.builtin = False
        inner = old.decode_loop

        def decode_loop(logits, history, opts, generator, advance):
            def timed(nxt, step):
                t0 = time.perf_counter()
                out = advance(nxt, step)
                self.seconds += time.perf_counter() - t0
                self.steps += 1
                return out

            return inner(logits, history, opts, generator, timed)

        old.decode_loop = decode_loop

    def host_per_step(self, result) -> float:
        if self.builtin:
            return result.timings["decode_host_per_step"]
        return (result.timings["decode"] - self.seconds) / self.steps


def measure(pipe, batch: int, new_tokens: int, stop: str | None, repeats: int, fix: str = "min_new_tokens") -> dict:
    """Per-step host overhead (ms) of `repeats` generate calls of `batch` conversations (after one
    untimed warm-up call); `fix`: how the output length is fixed (min_new_tokens | ignore_eos)."""
    convs = [[{"role": "user", "content": [{"type": "audio", "audio": synthetic_audio(2.0 + i, i)},
                                           {"type": "text", "text": "Transcribe the input speech."}]}]
             for i in range(batch)]
    opts = dict(max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0)
    opts.update(min_new_tokens=new_tokens) if fix == "min_new_tokens" else opts.update(ignore_eos=True)
    if stop:
        opts["stop"] = [stop]
    per_step, decode = [], []
    for i in range(repeats + 1):
        clock = StepClock()
        results = pipe.generate(convs, **opts)
        if len(results[0].token_ids) != new_tokens:
            raise RuntimeError(f"expected {new_tokens} tokens, got {len(results[0].token_ids)}")
        if i:
            per_step.append(clock.host_per_step(results[0]) * 1e3)
            decode.append(results[0].timings["decode"] / (new_tokens - 1) * 1e3)
    return {"batch": batch, "new_tokens": new_tokens, "stop_string": bool(stop), "length_fixed_by": fix,
            "repeats": repeats,
            "host_ms_per_step_p50": statistics.median(per_step), "host_ms_per_step_min": min(per_step),
            "decode_ms_per_step_p50": statistics.median(decode), "host_ms_per_step_all": per_step}


def run(model: str = "tiny", batches=(1, 8), new_tokens: int = 256, repeats: int = 3) -> dict:
    pipe = Pipeline.from_pretrained(model, device="cpu", dtype="float32")
    fixes = ["min_new_tokens"] + (["ignore_eos"] if _has_ignore_eos() else [])
    rows = [measure(pipe, b, new_tokens, stop, repeats, fix) for fix in fixes for b in batches for stop in (None, NEVER)]
    return {"benchmark": "host overhead per decode step", "model": model, "device": "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "commit": _commit(), "rows": rows}


def _has_ignore_eos() -> bool:
    try:  # older checkouts have no af3trt.runtime.generation
        options = importlib.import_module("af3trt.runtime.generation").GenerationOptions
    except (ImportError, AttributeError):
        return False
    return "ignore_eos" in {f.name for f in dataclasses.fields(options)}


def _commit() -> str | None:
    """The commit of the af3trt that was measured (the imported package's checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(af3trt.__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown(result: dict) -> str:
    lines = [f"host overhead per decode step, {result['model']} on {result['device']} (commit {result['commit']})", "",
             "| length fixed by | batch | stop string | host ms/step p50 | host ms/step min | decode ms/step p50 |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r.get('length_fixed_by', 'min_new_tokens')} | {r['batch']} | "
                     f"{'one' if r['stop_string'] else 'none'} | {r['host_ms_per_step_p50']:.4f} | "
                     f"{r['host_ms_per_step_min']:.4f} | {r['decode_ms_per_step_p50']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = run(args.model, tuple(int(b) for b in args.batch.split(",")), args.new_tokens, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
