"""Fast-path decoder weights: q/k/v and gate/up fused, FP8 linears kept in FP8, and the FP8 prefill matmul.

`FastWeights` is what `fast_decoder.FastTorchDecoder` runs: built from an HF Qwen2 state dict
(`fast_weights`; FP8 weights + scales from `fp8_weights.load_fp8_trtllm_checkpoint`) or random on
the device for benchmarks (`random_fast_weights`). Fusing puts the three attention projections
and the two MLP input projections into one (N, K) matrix each: one GEMV launch instead of three
(two) per layer, and a larger N that keeps more SMs streaming weights at batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.gemv import FP8_E4M3_MAX, dequantize_fp8_weight, quantize_fp8_weight
from ..spec import TextSpec
from .decoder import RMSNorm, rope_inv_freq

__all__ = ["FP8", "FastLayer", "FastLinear", "FastWeights", "fast_weights", "fp8_linear", "fuse_linears",
           "random_fast_weights"]

FP8 = torch.float8_e4m3fn

# --------------------------------------------------------------------------- weights


@dataclass
class FastLinear:
    """y = x @ W.T (+ bias). weight (N, K) in the model dtype, or float8_e4m3fn with float32
    `scale` (1,) per tensor or (N,) per output row (W ~= weight.float() * scale)."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.bias) if t is not None)


def fuse_linears(parts: list[FastLinear]) -> FastLinear:
    """Concatenate linears along N (outputs in the order given). FP8 parts with one shared scale keep
    it per tensor; different scales become one per output row, which the GEMV applies in its
    epilogue at no extra weight traffic."""
    fp8 = {p.weight.dtype == FP8 for p in parts}
    if len(fp8) != 1 or len({p.bias is None for p in parts}) != 1:
        raise ValueError(f"expected parts that are all FP8 or all not, all with or all without bias, got "
                         f"{[(p.weight.dtype, p.bias is not None) for p in parts]}")
    weight = torch.cat([p.weight for p in parts]).contiguous()
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    scale = None
    if fp8.pop():
        if any(p.scale is None for p in parts):
            raise ValueError("expected a scale with every float8_e4m3fn weight, got None")
        scales = [p.scale.float().reshape(-1) for p in parts]
        if all(s.numel() == 1 for s in scales) and all(torch.equal(s, scales[0]) for s in scales):
            scale = scales[0].clone()
        else:
            scale = torch.cat([s.expand(p.weight.shape[0]) for s, p in zip(scales, parts)]).contiguous()
    return FastLinear(weight, scale, bias)


@dataclass
class FastLayer:
    input_norm: RMSNorm
    post_norm: RMSNorm
    qkv: FastLinear  # rows [q; k; v]
    o: FastLinear
    gate_up: FastLinear  # rows [gate; up]
    down: FastLinear


@dataclass
class FastWeights:
    """Decoder weights in the fast layout; `inv_freq` is float32 whatever the model dtype."""

    text: TextSpec
    embed: torch.Tensor  # (V, H)
    layers: list[FastLayer]
    norm: RMSNorm
    lm_head: FastLinear
    inv_freq: torch.Tensor
    dtype: torch.dtype = torch.float32

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads (all but the embedding table, of which B rows)."""
        per_layer = [(l.qkv, l.o, l.gate_up, l.down) for l in self.layers]
        linears = sum(x.nbytes for group in per_layer for x in group) + self.lm_head.nbytes
        norms = sum(2 * l.input_norm.weight.numel() * l.input_norm.weight.element_size() for l in self.layers)
        return linears + norms + self.norm.weight.numel() * self.norm.weight.element_size()


def _norm(weight: torch.Tensor, eps: float) -> RMSNorm:
    norm = RMSNorm(weight.numel(), eps)
    norm.weight = nn.Parameter(weight, requires_grad=False)
    return norm


def fast_weights(text: TextSpec, state: dict, scales: dict | None = None, device="cpu",
                 dtype=torch.float32) -> FastWeights:
    """HF Qwen2 state dict (+ FP8 scales by weight name) -> FastWeights on `device`.

    float8_e4m3fn weights stay FP8; every other tensor becomes `dtype`. q/k/v and gate/up fuse.
    """
    scales = scales or {}

    def tensor(name):
        if name not in state:
            raise KeyError(f"expected HF Qwen2 tensor {name!r} in the state dict, missing")
        t = state[name]
        return t.to(device) if t.dtype == FP8 else t.to(device, dtype)

    def linear(prefix, bias=False):
        s = scales.get(prefix + ".weight")
        return FastLinear(tensor(prefix + ".weight"), None if s is None else s.to(device, torch.float32),
                          tensor(prefix + ".bias") if bias else None)

    layers, eps = [], text.rms_norm_eps
    for n in range(text.num_layers):
        p = f"model.layers.{n}."
        attn = [linear(p + f"self_attn.{x}_proj", bias=True) for x in "qkv"]
        layers.append(FastLayer(
            _norm(tensor(p + "input_layernorm.weight"), eps), _norm(tensor(p + "post_attention_layernorm.weight"), eps),
            fuse_linears(attn), linear(p + "self_attn.o_proj"),
            fuse_linears([linear(p + "mlp.gate_proj"), linear(p + "mlp.up_proj")]), linear(p + "mlp.down_proj")))
    head = "lm_head" if "lm_head.weight" in state or not text.tie_word_embeddings else "model.embed_tokens"
    return FastWeights(text, tensor("model.embed_tokens.weight"), layers, _norm(tensor("model.norm.weight"), eps),
                       linear(head), rope_inv_freq(text, device), dtype)


def random_fast_weights(text: TextSpec, device="cuda", dtype=torch.bfloat16, fp8: bool = False,
                        seed: int = 0) -> FastWeights:
    """Random weights built on `device` in the fast layout (benchmarks; timing ignores values).

    fp8: linears as float8_e4m3fn with per-tensor scales, lm_head kept in `dtype` (as ModelOpt's FP8
    export excludes it)."""
    gen = torch.Generator(device).manual_seed(seed)

    def rand(*shape, std=0.02):
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

    def linear(n, k, bias=False, quantize=fp8):
        w = rand(n, k)
        b = rand(n) if bias else None
        if not quantize:
            return FastLinear(w, None, b)
        w8, s = quantize_fp8_weight(w)
        return FastLinear(w8, s, b)

    h, q, kv = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    ones = partial(torch.ones, device=device, dtype=dtype)
    layers = [FastLayer(_norm(ones(h), text.rms_norm_eps), _norm(ones(h), text.rms_norm_eps),
                        linear(q + 2 * kv, h, bias=True), linear(h, q), linear(2 * text.intermediate_size, h),
                        linear(h, text.intermediate_size)) for _ in range(text.num_layers)]
    return FastWeights(text, rand(text.vocab_size, h), layers, _norm(ones(h), text.rms_norm_eps),
                       linear(text.vocab_size, h, quantize=False), rope_inv_freq(text, device), dtype)


# --------------------------------------------------------------------------- FP8 prefill matmul


@cache
def _scaled_mm_supported(device_index: int) -> bool:
    # cuBLASLt FP8 GEMMs need compute capability 8.9 (Ada) or 9.0+ (Hopper): aten's own check.
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device_index) >= (8, 9)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, scaled_mm: bool | None = None) -> torch.Tensor:
    """(M, K) x @ (w_fp8 (N, K) * scale).T (+ bias) -> (M, N) in x.dtype, for prefill-sized M.

    scaled_mm (default: on CUDA with FP8 GEMMs): x is quantized to e4m3 with one per-call scale
    amax(|x|) / 448 (computed on the device, no sync) and multiplied by `torch._scaled_mm` in FP8
    with fp32 output; the weight scale (per tensor or per row) is applied to that output, so a fused
    weight with per-row scales needs no second GEMM. Otherwise: dequantize the weight to x.dtype
    and `F.linear` (exactly what `load_trtllm_checkpoint` + `TorchDecoder` compute).
    """
    if scaled_mm is None:
        scaled_mm = x.is_cuda and _scaled_mm_supported(x.device.index or 0)
    if not scaled_mm:
        return F.linear(x, dequantize_fp8_weight(w_fp8, scale).to(x.dtype), bias)
    sx = (x.abs().amax().float() / FP8_E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    xq = (x.float() / sx).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    # w_fp8.t() is column-major (K, N): the layout cuBLASLt's FP8 GEMM requires for the 2nd operand.
    y = torch._scaled_mm(xq, w_fp8.t(), scale_a=sx, scale_b=one, out_dtype=torch.float32)
    y = y * scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
