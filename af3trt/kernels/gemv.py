"""Decode linears for batch <= 8 as OpenAI Triton GEMVs: `y = x @ W.T (* scale) (+ bias)`.

At batch 1-8 a linear reads every weight once and does almost no math, so it runs at the speed
of the weight read. cuBLAS reaches 57-72 % of copy bandwidth on the small Qwen2.5-7B matrices
(qkv, o_proj) because they have too few output tiles to keep every SM busy
(shared/reference/af3.md). These kernels split K as well as N so that each shape launches
several programs per SM, and the FP8 one reads float8_e4m3fn weights (half the bytes) and
dequantizes in registers: weight-only FP8, bf16 activations in, bf16 out, fp32 accumulation.

- `gemv_bf16(x, w, bias=None)`            x (M, K) bf16, w (N, K) bf16 -> (M, N) bf16
- `gemv_fp8(x, w_fp8, scale, bias=None)`  w_fp8 (N, K) float8_e4m3fn, scale float32 (1,) per
  tensor or (N,) per output channel, w ~= w_fp8.float() * scale
- `gemv_bf16_reference`, `gemv_fp8_reference`: the pure-torch references (fp32 math, one bf16
  rounding at the end), `quantize_fp8_weight` / `dequantize_fp8_weight`.

The wrappers validate shapes/dtypes/devices and run the Triton kernel on CUDA, or anywhere when
TRITON_INTERPRET=1 (CPU tests); otherwise they return the torch reference. triton is imported
lazily, so importing this module needs neither triton nor CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache, lru_cache

import torch

__all__ = [
    "DECODE_SHAPES",
    "FP8_E4M3_MAX",
    "MAX_M",
    "GemvConfig",
    "dequantize_fp8_weight",
    "gemv_bf16",
    "gemv_bf16_reference",
    "gemv_config",
    "gemv_fp8",
    "gemv_fp8_reference",
    "quantize_fp8_weight",
]

MAX_M = 8  # largest batch these kernels serve; above it a tensor-core GEMM (cuBLAS) wins
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
DOT_BLOCK_M = 16  # tl.dot needs >= 16 rows: M in 2..8 is padded to 16 (free: the op is memory-bound)
DEFAULT_SMS = 132  # H100 SXM / H200 streaming multiprocessors, for the heuristic without a device

# Qwen2.5-7B decode linears, (N, K) = (out_features, in_features); gate_up is gate_proj and
# up_proj fused along N.
DECODE_SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (4608, 3584),
    "o_proj": (3584, 3584),
    "gate_up": (37888, 3584),
    "down": (3584, 18944),
    "lm_head": (151672, 3584),
}


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of one GEMV.

    block_n: output features per program; block_k: K elements per loop step; split_k: programs
    along K (their fp32 partials are summed by a second small kernel); num_warps / num_stages as
    in Triton (num_stages: K-loop steps whose loads are in flight at once).
    """

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"expected {name} a power of two >= 16 (tl.dot operand), got {value}")
        if self.split_k < 1:
            raise ValueError(f"expected split_k >= 1, got {self.split_k}")

    def k_split(self, k: int) -> tuple[int, int]:
        """(K elements per split, splits launched) for a weight with `k` columns.

        Each split starts on a block_k boundary (aligned, vectorizable loads); the last one is
        shorter, and fewer than split_k splits run when K is small.
        """
        k_per_split = _cdiv(_cdiv(k, self.split_k), self.block_k) * self.block_k
        return k_per_split, _cdiv(k, k_per_split)

    def programs(self, n: int, k: int) -> int:
        """Programs the GEMV kernel launches for an (N, K) weight."""
        return _cdiv(n, self.block_n) * self.k_split(k)[1]


# Hand-set starting points for the five decode shapes, to be confirmed on the card with
# `benchmarks/kernels_bench.py --sweep`. Rules behind them:
# - block_k moves ROW_STEP_BYTES = 256 B of each weight row per step (128 bf16 / 256 fp8): whole
#   128-B sectors, 16-B vector loads per thread, and the same 8 KiB weight tile per step for both.
# - block_n 32 for the 3.5k/4.6k-row matrices gives 112-144 column tiles, so split_k brings the
#   launch to ~450-900 programs (3-7 per SM on 132 SMs) while each program still streams
#   >= 56 KiB of weights; block_n 64 for the wide matrices (gate_up, lm_head) already gives
#   592-2370 programs without a split, whose extra partials would cost a write and a read.
# - down (K 18944) splits 8 ways: 112 column tiles x 8 = 896 programs (bf16: 2432 K each; fp8: 10
#   steps, the last 4).
# - FP8, K 3584 = 14 x 256 splits evenly only 2, 7 or 14 ways: 7 gives qkv / o_proj 1008 / 784
#   programs of 2 steps (2 ways would leave 288 / 224 programs, under 3 per SM).
ROW_STEP_BYTES = 256
# (N, K) -> (block_n, split_k bf16, split_k fp8)
_DECODE_SHAPES: dict[tuple[int, int], tuple[int, int, int]] = {
    (4608, 3584): (32, 4, 7),  # qkv
    (3584, 3584): (32, 4, 7),  # o_proj
    (37888, 3584): (64, 1, 1),  # gate_up
    (3584, 18944): (32, 8, 8),  # down
    (151672, 3584): (64, 1, 1),  # lm_head
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_config(n: int, k: int, *, fp8: bool = False, num_sms: int = DEFAULT_SMS) -> GemvConfig:
    """Launch config for an (N, K) weight: the table entry for the Qwen2.5-7B decode shapes, else
    a heuristic that splits K until the launch has ~4 programs per SM or a split would hold
    fewer than 4 K-steps."""
    block_k = ROW_STEP_BYTES // (1 if fp8 else 2)  # 256 B of a weight row per step (see the table's comment)
    if (n, k) in _DECODE_SHAPES:
        block_n, split_bf16, split_fp8 = _DECODE_SHAPES[(n, k)]
        return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_fp8 if fp8 else split_bf16)
    # 64-wide tiles once they alone give ~4 programs per SM (no split needed), else 32 (16 for tiny N)
    block_n = 64 if _cdiv(n, 64) >= 4 * num_sms else 32 if n >= 32 else 16
    split_k = 1
    while _cdiv(n, block_n) * split_k < 4 * num_sms and _cdiv(k, block_k * split_k * 2) >= 4:
        split_k *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k)


# ---------------------------------------------------------------- references and FP8 helpers


def _apply_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.float()


def gemv_bf16_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch reference: (M, K) bf16 @ (N, K).T bf16 (+ (N,) bias) in fp32 -> (M, N) bf16."""
    return _apply_bias(x.float() @ w.float().T, bias).to(torch.bfloat16)


def dequantize_fp8_weight(w_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, K) float8_e4m3fn weight and float32 scale ((1,) or (N,)) -> (N, K) float32 weight."""
    return w_fp8.float() * scale.float().reshape(-1, 1)


def gemv_fp8_reference(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure-torch reference: (M, K) bf16 @ dequantized (N, K).T (+ bias) in fp32 -> (M, N) bf16."""
    return _apply_bias(x.float() @ dequantize_fp8_weight(w_fp8, scale).T, bias).to(torch.bfloat16)


def quantize_fp8_weight(w: torch.Tensor, *, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> ((N, K) float8_e4m3fn, float32 scale) with w ~= w_fp8.float() * scale.

    Per tensor (default): scale = amax(|w|) / 448, shape (1,), the layout of a TensorRT-LLM FP8
    checkpoint's `weights_scaling_factor` (ModelOpt "max" calibration). per_channel=True: one
    scale per output row, shape (N,). An all-zero weight (or row) gets scale 1.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D floating weight (N, K), got {tuple(w.shape)} {w.dtype}")
    wf = w.float()
    amax = wf.abs().amax(dim=1) if per_channel else wf.abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax, torch.full_like(amax, FP8_E4M3_MAX)) / FP8_E4M3_MAX
    w_fp8 = (wf / scale.reshape(-1, 1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return w_fp8, scale.to(torch.float32)


# ---------------------------------------------------------------- validation


def _expect(cond: bool, what: str, got) -> None:
    if not cond:
        raise ValueError(f"expected {what}, got {got}")


def _check_operands(x, w, weight_dtype: torch.dtype, bias) -> None:
    for name, t in (("x", x), ("weight", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected {name} to be a torch.Tensor, got {type(t).__name__}")
    _expect(x.dim() == 2 and 1 <= x.shape[0] <= MAX_M, f"x of shape (M <= {MAX_M}, K)", tuple(x.shape))
    _expect(x.dtype == torch.bfloat16, "x dtype torch.bfloat16", x.dtype)
    _expect(x.stride(-1) == 1, "x with contiguous rows (stride(-1) == 1)", x.stride())
    _expect(w.dim() == 2 and w.shape[1] == x.shape[1], f"weight of shape (N, {x.shape[1]})", tuple(w.shape))
    _expect(w.dtype == weight_dtype, f"weight dtype {weight_dtype}", w.dtype)
    _expect(w.is_contiguous(), "a contiguous (N, K) row-major weight", f"strides {w.stride()}")
    _expect(w.device == x.device, f"weight on {x.device}", w.device)
    if bias is not None:
        _expect(
            isinstance(bias, torch.Tensor) and tuple(bias.shape) == (w.shape[0],),
            f"bias of shape ({w.shape[0]},)",
            getattr(bias, "shape", type(bias)),
        )
        _expect(bias.dtype == torch.bfloat16 and bias.is_contiguous(), "a contiguous bfloat16 bias", bias.dtype)
        _expect(bias.device == x.device, f"bias on {x.device}", bias.device)


def _check_scale(scale, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"expected scale to be a float32 torch.Tensor, got {type(scale).__name__}")
    _expect(scale.dtype == torch.float32, "scale dtype torch.float32", scale.dtype)
    _expect(scale.numel() in (1, n) and scale.dim() <= 1, f"scale of shape (1,) or ({n},)", tuple(scale.shape))
    _expect(scale.device == device, f"scale on {device}", scale.device)
    return scale.reshape(-1).contiguous()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_kernel(device: torch.device) -> bool:
    return device.type == "cuda" or _interpret()


# ---------------------------------------------------------------- Triton kernels


@lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """Define the Triton kernels; keyed by TRITON_INTERPRET because triton.jit reads it at
    decoration time (the interpreter runs the same source on CPU tensors)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "af3trt.kernels.gemv needs OpenAI Triton to run its kernels (on CUDA or under TRITON_INTERPRET=1): "
            "pip install triton"
        ) from exc

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
        M, N, K, k_per_split, stride_xm, stride_wn, stride_os,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
        HAS_SCALE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_N outputs x all M rows over one K split. The weight tile is loaded
        # once and used for every row; x (<= 8 x BLOCK_K) is tiny and stays in L1/L2.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        m_mask = offs_m < M
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            # M == 1: multiply-add elementwise and reduce once after the loop; no tensor-core
            # operand layout (a shared-memory round trip) for a single row.
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
            )
            if USE_DOT:
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    # Interpreter only: it multiplies bf16 bit patterns in tl.dot
                    # (triton-lang/triton#11584); bf16 x bf16 products are exact in fp32 anyway.
                    acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
                else:
                    # e4m3 -> bf16 is exact (3 vs 7 mantissa bits, bf16's exponent covers e4m3's),
                    # so the scale waits for the epilogue: one multiply per output, not per weight.
                    acc += tl.dot(x, tl.trans(w.to(tl.bfloat16)))
            else:
                x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
                acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if USE_DOT:
            y = acc
        else:
            y = tl.sum(acc, axis=1)[None, :]
        if HAS_SCALE:
            if PER_CHANNEL:
                y = y * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
            else:
                y = y * tl.load(scale_ptr)
        if HAS_BIAS:  # only when the launch has no split (else the reduction adds it once)
            y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + pid_k * stride_os + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def splitk_reduce_kernel(
        partial_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
    ):
        # Sum the SPLIT_K fp32 partials (SPLIT_K, M, N) in a fixed order: deterministic results
        # (greedy decoding must not flip between runs), unlike fp32 atomics.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(partial_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return gemv_kernel, splitk_reduce_kernel


# Outputs per program of the split-K reduction: 8 fp32 per thread at 4 warps (two 16-B loads per
# partial). It moves split_k x M x N x 4 B, e.g. 0.9 MB for down at M 8 vs its 136 MB of weights.
REDUCE_BLOCK = 1024


def _launch(x, w, scale, bias, config: GemvConfig) -> torch.Tensor:
    gemv_kernel, splitk_reduce_kernel = _kernels(_interpret())
    m, k = x.shape
    n = w.shape[0]
    k_per_split, split_k = config.k_split(k)
    use_dot = m > 1
    interpret = _interpret()
    # Under the interpreter the kernels write fp32 and torch rounds to bf16: the interpreter's
    # fp32 -> bf16 cast truncates (triton/runtime/interpreter.py `cast_impl` passes no rounding
    # mode) where the GPU rounds to nearest even. The kernels cast to whatever `out` holds.
    out = torch.empty((m, n), dtype=torch.float32 if interpret else torch.bfloat16, device=x.device)
    dest = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    dummy = out  # pointer for absent scale/bias; never read (constexpr-disabled)
    grid = (_cdiv(n, config.block_n), split_k)
    gemv_kernel[grid](
        x, w, dummy if scale is None else scale, dummy if bias is None else bias, dest,
        m, n, k, k_per_split, x.stride(0), w.stride(0), m * n,
        BLOCK_M=DOT_BLOCK_M if use_dot else 1, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_DOT=use_dot, DOT_FP32=interpret,
        HAS_SCALE=scale is not None, PER_CHANNEL=scale is not None and scale.numel() > 1,
        HAS_BIAS=bias is not None and split_k == 1,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split_k > 1:
        splitk_reduce_kernel[(_cdiv(m * n, REDUCE_BLOCK),)](
            dest, dummy if bias is None else bias, out, m * n, n,
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
        )  # fmt: skip
    return out.to(torch.bfloat16) if interpret else out


# ---------------------------------------------------------------- public wrappers


def gemv_bf16(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, config: GemvConfig | None = None
) -> torch.Tensor:
    """Split-K bf16 GEMV: x (M <= 8, K) bf16 @ w (N, K).T bf16 (+ bias (N,) bf16) -> (M, N) bf16.

    fp32 accumulation, one rounding to bf16. `config` defaults to `gemv_config(N, K)`. Off CUDA
    (without TRITON_INTERPRET=1) returns `gemv_bf16_reference`.
    """
    _check_operands(x, w, torch.bfloat16, bias)
    if not _use_kernel(x.device):
        return gemv_bf16_reference(x, w, bias)
    return _launch(x, w, None, bias, config or gemv_config(w.shape[0], w.shape[1], num_sms=_num_sms(x.device)))


def gemv_fp8(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Weight-only FP8 GEMV: x (M <= 8, K) bf16 @ (w_fp8 (N, K) float8_e4m3fn * scale).T -> (M, N) bf16.

    scale: float32, (1,) per tensor (TensorRT-LLM `weights_scaling_factor`) or (N,) per output
    channel. Weights are dequantized in registers, fp32 accumulation, scale and bias applied in
    the epilogue. Off CUDA (without TRITON_INTERPRET=1) returns `gemv_fp8_reference`.
    """
    _check_operands(x, w_fp8, torch.float8_e4m3fn, bias)
    scale = _check_scale(scale, w_fp8.shape[0], x.device)
    if not _use_kernel(x.device):
        return gemv_fp8_reference(x, w_fp8, scale, bias)
    return _launch(
        x,
        w_fp8,
        scale,
        bias,
        config or gemv_config(w_fp8.shape[0], w_fp8.shape[1], fp8=True, num_sms=_num_sms(x.device)),
    )


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
