"""What `trtllm-build` (TensorRT-LLM 1.2) makes of af3trt's flags for a precision, KV-cache format and GPU.

TensorRT-LLM's `tensorrt_llm/builder.py` `build()` (the 1.x version, read through the code index)
rewrites the plugin config after parsing the flags, with only a warning:
- weights other than FP8 / W4A8_AWQ / NVFP4: FP8 context FMHA off, and with an FP8 KV cache paged
  context FMHA off too ("FP8 Paged Context FMHA is disabled because FP8 context FMHA is disabled");
- below SM89 (FP8 weights): FP8 context FMHA off, and with an FP8 KV cache paged context FMHA off;
- with paged context FMHA and FP8 weights: FP8 context FMHA only together with an FP8 KV cache (off
  without one, forced on with one);
- an INT8 KV cache: paged context FMHA off ("doesn't work with int8 kv cache currently");
- on SM 100-119 it refuses INT8/INT4 weight-only and INT8 KV ("INT8/INT4 quantization is not
  supported on SM>=100") and SmoothQuant ("SmoothQuant is not supported on SM>=100").
KV-cache block reuse needs paged context FMHA (NVIDIA's KV-cache reuse docs); af3trt enables reuse
in the executor and in the Triton config only where the engine has it
(`af3trt.formats.trtllm_engine.kv_reuse_allowed`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import OptionError
from ..formats.precision import get_kv_cache, get_precision

log = logging.getLogger(__name__)

DEFAULT_TARGET_SM = 90  # H100 / H200, the mission's GPUs: assumed where no GPU is present at build
_FP8_CONTEXT_ALGOS = ("FP8", "W4A8_AWQ", "NVFP4")
_WEIGHT_ONLY_INT = ("W8A16", "W4A16", "W4A16_AWQ", "W4A16_GPTQ")
_SMOOTHQUANT = ("W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
                "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN")


class UnsupportedTarget(OptionError):
    """A precision / KV-cache format that trtllm-build refuses on the target GPU."""


@dataclass(frozen=True)
class TargetGPU:
    """sm: compute capability as major*10+minor (90 = Hopper); source: the GPU's name, or the assumption."""

    sm: int
    source: str

    def record(self) -> dict:
        return {"sm": self.sm, "source": self.source}


def target_gpu(requested_sm: int | None = None) -> TargetGPU:
    """The GPU the engine is built for: the one present (CUDA device 0), else `requested_sm` or 90."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        sm = major * 10 + minor
        if requested_sm is not None and requested_sm != sm:
            raise OptionError(f"expected --target-sm {sm} (the GPU present, {torch.cuda.get_device_name(0)}) or "
                             f"none, got {requested_sm}")
        return TargetGPU(sm, f"present: {torch.cuda.get_device_name(0)}")
    if requested_sm is None:
        return TargetGPU(DEFAULT_TARGET_SM, f"assumed: no GPU at build, default SM{DEFAULT_TARGET_SM} (H100/H200); "
                                            "set --target-sm for another GPU")
    if not isinstance(requested_sm, int) or not 70 <= requested_sm < 200:
        raise OptionError(f"expected --target-sm as major*10+minor in [70, 200) (e.g. 90, 89, 100), got {requested_sm!r}")
    return TargetGPU(requested_sm, "assumed: no GPU at build, --target-sm")


@dataclass(frozen=True)
class EnginePlugins:
    """The plugin settings trtllm-build ends with, and why they differ from what af3trt asked."""

    use_paged_context_fmha: bool
    use_fp8_context_fmha: bool
    changes: tuple[str, ...] = ()

    @property
    def kv_cache_reuse(self) -> bool:
        return self.use_paged_context_fmha

    def record(self) -> dict:
        return {"use_paged_context_fmha": self.use_paged_context_fmha,
                "use_fp8_context_fmha": self.use_fp8_context_fmha, "kv_cache_reuse": self.kv_cache_reuse,
                "changes": list(self.changes)}


def effective_plugins(precision, kv_cache, sm: int, paged_context_fmha: bool = True,
                      fp8_context_fmha: bool | None = None) -> EnginePlugins:
    """trtllm-build's rules (module docstring) applied to what af3trt's flags ask (paged context FMHA
    on; FP8 context FMHA for fp8). Raises `UnsupportedTarget` for what it refuses on SM 100-119."""
    p, kv = get_precision(precision), get_kv_cache(kv_cache)
    algo, kv_algo = p.quant_algo, kv.kv_cache_quant_algo
    combo = f"--precision {p.name} --kv-cache {kv.name} on SM{sm}"
    if 100 <= sm < 120:
        if algo in _WEIGHT_ONLY_INT or kv_algo == "INT8":
            raise UnsupportedTarget(f"{combo}: trtllm-build refuses INT8/INT4 weight-only and INT8 KV caches on "
                                    f"SM 100-119 (\"INT8/INT4 quantization is not supported on SM>=100\"); "
                                    f"expected bf16, fp16 or fp8 with --kv-cache auto or fp8 there")
        if algo in _SMOOTHQUANT:
            raise UnsupportedTarget(f"{combo}: trtllm-build refuses SmoothQuant on SM 100-119 (\"SmoothQuant is "
                                    f"not supported on SM>=100\"); expected bf16, fp16 or fp8 there")
    paged = paged_context_fmha
    fp8_ctx = p.fp8_context_fmha if fp8_context_fmha is None else fp8_context_fmha
    changes = []
    if algo not in _FP8_CONTEXT_ALGOS:
        fp8_ctx = False
        if paged and kv_algo == "FP8":
            paged = False
            changes.append(f"{combo}: an FP8 KV cache with non-FP8 weights turns paged context FMHA off")
    elif sm < 89:
        fp8_ctx = False
        if paged and kv_algo == "FP8":
            paged = False
            changes.append(f"{combo}: FP8 context FMHA needs SM89+, and without it an FP8 KV cache turns paged "
                           f"context FMHA off")
    elif paged:
        fp8_ctx = kv_algo == "FP8"
    if paged and kv_algo == "INT8":
        paged = False
        changes.append(f"{combo}: an INT8 KV cache turns paged context FMHA off")
    return EnginePlugins(paged, fp8_ctx, tuple(changes))


def check_build(precision, kv_cache, target: TargetGPU) -> EnginePlugins:
    """At `af3trt build`, before calibration: refuse what trtllm-build refuses on the target; warn,
    naming the combination, where paged context FMHA (hence KV-cache reuse) is lost."""
    plugins = effective_plugins(precision, kv_cache, target.sm)
    for change in plugins.changes:
        log.warning("%s: KV-cache block reuse is disabled for this engine (it needs paged context FMHA); "
                    "use --kv-cache auto (or fp8 weights with an fp8 KV cache on SM89+) to keep it", change)
    return plugins
