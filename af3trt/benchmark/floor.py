"""Hardware floors: what the card can do at best, and what AF3 therefore cannot beat.

`measure(device)` times a large device-to-device copy (bytes read + written per second) and a
square bf16 matmul (FLOP/s). From a `ModelSpec` and those two rates:
- decode floor per step = (decoder weight bytes + KV-cache bytes read) / copy bandwidth
  (batch-1..8 decode reads every weight once per step and does little math);
- prefill floor = LM FLOPs of the prompt / matmul rate; encoder floor = encoder FLOPs / matmul rate.
On CPU the same measurements run at small sizes and the record says `device: cpu`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass

import torch

from ..dtypes import DTYPES
from ..errors import lookup
from ..formats.precision import KV_CACHES, PRECISIONS
from ..spec import FRAMES_PER_WINDOW, TOKENS_PER_WINDOW, AudioSpec, ModelSpec, TextSpec, conv_frames
from ..stats import device_times
from ..tiny import full_spec
from .env import environment

UNQUANTIZED = ("bf16", "fp16", "fp32")
_FLOAT_BYTES = {d.short: d.bytes for d in DTYPES.values() if d.short in UNQUANTIZED}
# bytes per decoder weight: the precision registry (af3trt.formats.precision.PRECISIONS, the names
# `af3trt build --precision` takes and benchmark rows carry), plus fp32 for CPU torch rows
WEIGHT_BYTES = {**_FLOAT_BYTES, **{name: spec.weight_bytes for name, spec in PRECISIONS.items()}}
KV_BYTES = {**_FLOAT_BYTES,
            **{name: spec.bytes_per_value for name, spec in KV_CACHES.items() if spec.bytes_per_value}}


@dataclass(frozen=True)
class MeasureSizes:
    copy_bytes: int  # size of the copied buffer (read once, written once per copy)
    matmul_n: int  # n of the (n, n) @ (n, n) matmul
    repeats: int


SIZES = {"cuda": MeasureSizes(1 << 30, 8192, 20), "cpu": MeasureSizes(32 << 20, 256, 5)}


def _copy_seconds(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return statistics.median(device_times(lambda: dst.copy_(src), repeats, 1, device))


def _matmul_seconds(device: torch.device, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return statistics.median(device_times(lambda: torch.mm(a, b, out=out), repeats, 1, device))


def measure(device: str | torch.device = "cuda", sizes: MeasureSizes | None = None) -> dict:
    """Copy bandwidth (GB/s, read + write bytes) and bf16 matmul rate (TFLOP/s), medians over repeats."""
    device = torch.device(device)
    sizes = sizes or SIZES["cuda" if device.type == "cuda" else "cpu"]
    copy_s = _copy_seconds(device, sizes.copy_bytes, sizes.repeats)
    mm_s = _matmul_seconds(device, sizes.matmul_n, sizes.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": device.type,
        "device_name": name,
        "copy_gbps": 2 * sizes.copy_bytes / copy_s / 1e9,
        "matmul_bf16_tflops": 2 * sizes.matmul_n**3 / mm_s / 1e12,
        "copy_bytes": sizes.copy_bytes,
        "matmul_n": sizes.matmul_n,
        "repeats": sizes.repeats,
        "method": "median of CUDA-event timings" if device.type == "cuda" else "median of perf_counter timings",
    }


# -- model arithmetic ---------------------------------------------------------------------------
def lm_layer_matmul_params(t: TextSpec) -> int:
    """Weights of one decoder layer's linears (q, k, v, o, gate, up, down)."""
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    return t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size


def lm_params(t: TextSpec) -> dict[str, int]:
    """Parameter counts of the LM: embedding, layers (linears + biases + norms), lm_head."""
    kv = t.num_kv_heads * t.head_dim
    per_layer = lm_layer_matmul_params(t) + t.num_heads * t.head_dim + 2 * kv + 2 * t.hidden_size
    embed = t.vocab_size * t.hidden_size
    head = 0 if t.tie_word_embeddings else t.vocab_size * t.hidden_size
    layers = t.num_layers * per_layer + t.hidden_size
    return {"embedding": embed, "layers": layers, "lm_head": head, "total": embed + layers + head}


def decode_weight_bytes(t: TextSpec, precision: str = "bf16") -> float:
    """Bytes one decode step reads: all LM weights but the embedding table (only B rows are read).

    A quantized precision applies to the layers; lm_head stays bf16, as ModelOpt's exports and
    af3trt's FP8 path keep it (norms and biases are counted at the precision too: negligible)."""
    p = lm_params(t)
    head = p["lm_head"] or p["embedding"]
    per_weight = lookup(WEIGHT_BYTES, precision, "weight precision")
    head_bytes = per_weight if precision in UNQUANTIZED else WEIGHT_BYTES["bf16"]
    return p["layers"] * per_weight + head * head_bytes


def kv_bytes_per_token(t: TextSpec, kv_precision: str = "bf16") -> float:
    """K and V of every layer for one token (bf16 Qwen2.5-7B: 2 x 28 x 4 x 128 x 2 B = 56 KiB)."""
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * lookup(KV_BYTES, kv_precision, "KV-cache precision")


def prefill_flops(t: TextSpec, tokens: int, batch: int = 1) -> float:
    """LM FLOPs of a prompt of `tokens` per sequence: linears 2·W·T plus causal attention 2·(QK + PV)/2."""
    linears = 2 * t.num_layers * lm_layer_matmul_params(t) * tokens
    attention = 2 * t.num_layers * t.num_heads * t.head_dim * tokens * tokens  # 4·h·T² halved by causality
    return float(batch * (linears + attention + 2 * t.vocab_size * t.hidden_size))


def encoder_flops(a: AudioSpec, text_hidden: int, windows: int) -> float:
    """Encoder + projector FLOPs for `windows` full 30 s windows (every window runs all 1500 positions)."""
    d, f = a.hidden_size, a.intermediate_size
    positions = int(conv_frames(FRAMES_PER_WINDOW))
    convs = 2 * FRAMES_PER_WINDOW * a.num_mel_bins * 3 * d + 2 * positions * d * 3 * d
    layers = a.num_layers * (2 * positions * (4 * d * d + 2 * d * f) + 4 * positions * positions * d)
    projector = 2 * TOKENS_PER_WINDOW * (d * text_hidden + text_hidden * text_hidden)
    return float(windows * (convs + layers + projector))


def floors(spec: ModelSpec, hw: dict, *, batch: int = 1, prompt_tokens: int = 0, new_tokens: int = 0,
           windows: int = 0, precision: str = "bf16", kv_precision: str = "bf16") -> dict:
    """Lower bounds in ms for one generate call of `batch` equal prompts (hw from `measure`).

    decode_ms_per_token reads the weights once plus each sequence's KV cache at its mean length
    during decoding (prompt + new/2); decode_ms_per_token_weights_only is the batch-independent part.
    """
    t = spec.text
    bandwidth = hw["copy_gbps"] * 1e9
    rate = hw["matmul_bf16_tflops"] * 1e12
    weights = decode_weight_bytes(t, precision)
    context = prompt_tokens + new_tokens / 2
    kv = batch * context * kv_bytes_per_token(t, kv_precision)
    return {
        "precision": precision,
        "decode_weight_gb": weights / 1e9,
        "decode_ms_per_token_weights_only": weights / bandwidth * 1e3,
        "decode_ms_per_token": (weights + kv) / bandwidth * 1e3,
        "prefill_ms": prefill_flops(t, prompt_tokens, batch) / rate * 1e3 if prompt_tokens else None,
        "encoder_ms": encoder_flops(spec.audio, t.hidden_size, windows) / rate * 1e3 if windows else None,
    }


def model_summary(spec: ModelSpec, hw: dict | None = None) -> dict:
    """Parameter counts and (with hw) the batch-1 decode floors of each weight precision."""
    lm = lm_params(spec.text)
    a = spec.audio
    enc_layer = 4 * a.hidden_size * a.hidden_size + 2 * a.hidden_size * a.intermediate_size
    out = {"lm_params": lm, "encoder_matmul_params": a.num_layers * enc_layer,
           "decode_weight_gb": {p: decode_weight_bytes(spec.text, p) / 1e9 for p in ("bf16", "fp8", "int4_awq")},
           "kv_kib_per_token_bf16": kv_bytes_per_token(spec.text) / 1024}
    if hw:
        bandwidth = hw["copy_gbps"] * 1e9
        out["decode_floor_ms_per_token_batch1"] = {p: gb * 1e9 / bandwidth * 1e3
                                                   for p, gb in out["decode_weight_gb"].items()}
    return out


FLOOR_SCHEMA = "af3trt.floor/1"


def floor_record(device: str | None = None) -> dict:
    """Environment, measured rates and the full-size AF3 decode floors per weight precision."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hw = measure(device)
    return {"schema": FLOOR_SCHEMA, "env": environment(), "hardware": hw, "model": model_summary(full_spec(), hw)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="measure copy bandwidth and bf16 matmul rate; print AF3 floors")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    text = json.dumps(floor_record(args.device), indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
