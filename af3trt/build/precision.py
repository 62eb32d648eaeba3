"""Decoder precisions and KV-cache formats: registry name -> ModelOpt config + TRT-LLM `quantization`.

Each `PrecisionSpec` names (a) the ModelOpt quantization config, by its attribute name on
`modelopt.torch.quantization`, that `mtq.quantize` applies before export, and (b) the `quantization`
block TensorRT-LLM reads from the checkpoint's config.json (shared/reference/trtllm.md §2.1, §2.3,
§2.4b). The KV-cache spec is combined with it through ModelOpt's own helper when the installed
ModelOpt has one; configs are never edited entry by entry, since the ModelOpt pinned by TensorRT-LLM
1.2 containers (0.37) stores `quant_cfg` as a dict and ModelOpt >= 0.44 as a list.

INT8 weight-only follows TensorRT-LLM's own ModelOpt flow (`quantize_by_modelopt.py`: `"int8_wo":
EMPTY_CFG`): ModelOpt leaves the weights in float, config.json says `W8A16`, and trtllm-build
quantizes them per output channel when it loads the checkpoint. A checkpoint with ModelOpt-int8
weights would carry `weights_scaling_factor`, which TensorRT-LLM's W8A16 loader does not read (it
expects `per_channel_scale` in its own packed layout).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import OptionError

DTYPES = ("bfloat16", "float16")
KV_QUANTIZER = "*[kv]_bmm_quantizer"  # ModelOpt's K/V quantizers on attention (FP8_KV_CFG uses it too)


@dataclass(frozen=True)
class PrecisionSpec:
    """One decoder precision: what ModelOpt does and what TensorRT-LLM is told.

    quant_algo: TRT-LLM `QuantAlgo` value written to config.json (None = not quantized).
    modelopt_cfg: attribute of `modelopt.torch.quantization` passed to `mtq.quantize`; None = ModelOpt
        quantizes no weight (bf16/fp16, and int8_wo where trtllm-build quantizes).
    dtype: fixed dtype of the unquantized tensors (bf16, fp16); None = the caller chooses.
    group_size / has_zero_point / pre_quant_scale / exclude_modules: the rest of the block.
    weight_bytes: bytes per quantized weight the engine reads (decode floors; scales negligible).
    """

    name: str
    description: str
    quant_algo: str | None
    modelopt_cfg: str | None
    dtype: str | None = None
    group_size: int = 128
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: tuple[str, ...] | None = None
    weight_bytes: float = 2.0

    @property
    def exported_quant_algo(self) -> str | None:
        """The `quant_algo` ModelOpt's export reports before our post-fix (None when it quantized nothing)."""
        return self.quant_algo if self.modelopt_cfg else None

    @property
    def fp8_context_fmha(self) -> bool:
        return self.quant_algo == "FP8"


@dataclass(frozen=True)
class KVCacheSpec:
    """KV-cache format. `modelopt_cfg` names a ModelOpt preset; `num_bits` builds the K/V quantizer
    fragment where ModelOpt ships none (INT8); both None = cache in the model dtype."""

    name: str
    description: str
    kv_cache_quant_algo: str | None
    modelopt_cfg: str | None = None
    num_bits: int | None = None
    bytes_per_value: float | None = None  # None: the model dtype's


_LM_HEAD = ("lm_head",)  # what ModelOpt's TRT-LLM export excludes for Qwen2 (lm_head stays bf16/fp16)

PRECISIONS: Mapping[str, PrecisionSpec] = MappingProxyType({
    "bf16": PrecisionSpec("bf16", "bfloat16 weights and activations", None, None, dtype="bfloat16"),
    "fp16": PrecisionSpec("fp16", "float16 weights and activations", None, None, dtype="float16"),
    "fp8": PrecisionSpec("fp8", "W8A8 FP8 E4M3, per-tensor static scales (SM89+)", "FP8", "FP8_DEFAULT_CFG",
                         exclude_modules=_LM_HEAD, weight_bytes=1.0),
    "int8_wo": PrecisionSpec("int8_wo", "W8A16 INT8 weight-only, per-channel (trtllm-build quantizes)",
                             "W8A16", None, weight_bytes=1.0),
    "int8_sq": PrecisionSpec("int8_sq", "W8A8 INT8 SmoothQuant, per-channel weights, per-tensor activations",
                             "W8A8_SQ_PER_CHANNEL", "INT8_SMOOTHQUANT_CFG", exclude_modules=_LM_HEAD, weight_bytes=1.0),
    "int4_awq": PrecisionSpec("int4_awq", "W4A16 INT4 AWQ, group 128, activation pre-quant scale",
                              "W4A16_AWQ", "INT4_AWQ_CFG", pre_quant_scale=True, exclude_modules=_LM_HEAD,
                              weight_bytes=0.5),
})

KV_CACHES: Mapping[str, KVCacheSpec] = MappingProxyType({
    "auto": KVCacheSpec("auto", "KV cache in the model dtype", None),
    "fp8": KVCacheSpec("fp8", "FP8 E4M3 KV cache, per-tensor scales", "FP8", modelopt_cfg="FP8_KV_CFG",
                       bytes_per_value=1.0),
    "int8": KVCacheSpec("int8", "INT8 KV cache, per-tensor scales", "INT8", num_bits=8, bytes_per_value=1.0),
})


def get_precision(name: "str | PrecisionSpec") -> PrecisionSpec:
    """The registered precision `name`; ValueError naming the valid ones otherwise."""
    if isinstance(name, PrecisionSpec):
        return name
    if name not in PRECISIONS:
        raise OptionError(f"unknown decoder precision {name!r}; expected one of {sorted(PRECISIONS)}")
    return PRECISIONS[name]


def get_kv_cache(name: "str | KVCacheSpec") -> KVCacheSpec:
    """The registered KV-cache format `name`; ValueError naming the valid ones otherwise."""
    if isinstance(name, KVCacheSpec):
        return name
    if name not in KV_CACHES:
        raise OptionError(f"unknown KV-cache format {name!r}; expected one of {sorted(KV_CACHES)}")
    return KV_CACHES[name]


def resolve_dtype(precision: str | PrecisionSpec, dtype: str | None = None) -> str:
    """dtype of the unquantized tensors: the precision's own (bf16/fp16) or `dtype` (default bfloat16)."""
    spec = get_precision(precision)
    if dtype is not None and dtype not in DTYPES:
        raise OptionError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    if spec.dtype and dtype and dtype != spec.dtype:
        raise OptionError(f"precision {spec.name!r} fixes dtype {spec.dtype!r}, got dtype {dtype!r}")
    return spec.dtype or dtype or "bfloat16"


def needs_calibration(precision: str | PrecisionSpec, kv_cache: str | KVCacheSpec = "auto") -> bool:
    """True when ModelOpt must run calibration batches (any static weight/activation/KV scale)."""
    return bool(get_precision(precision).modelopt_cfg or get_kv_cache(kv_cache).kv_cache_quant_algo)


def trtllm_quantization(precision: str | PrecisionSpec, kv_cache: str | KVCacheSpec = "auto") -> dict:
    """The config.json `quantization` block TensorRT-LLM reads (QuantConfig fields, reference §2.1)."""
    p, kv = get_precision(precision), get_kv_cache(kv_cache)
    return {
        "quant_algo": p.quant_algo,
        "kv_cache_quant_algo": kv.kv_cache_quant_algo,
        "group_size": p.group_size,
        "has_zero_point": p.has_zero_point,
        "pre_quant_scale": p.pre_quant_scale,
        "exclude_modules": list(p.exclude_modules) if p.exclude_modules is not None else None,
    }


def _mtq():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "quantized decoder export needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[torch]' "
            f"(import failed: {e})"
        ) from e
    return mtq


def _preset(mtq, name: str) -> dict:
    cfg = getattr(mtq, name, None)
    if not isinstance(cfg, Mapping):
        import modelopt

        raise RuntimeError(
            f"expected modelopt.torch.quantization.{name} (a quantization config dict) in ModelOpt "
            f"{getattr(modelopt, '__version__', '?')}, got {type(cfg).__name__}"
        )
    return copy.deepcopy(dict(cfg))


def _kv_fragment(mtq, kv: KVCacheSpec):
    """The K/V quantizer entries, in the `quant_cfg` format (dict or list) of the installed ModelOpt."""
    if kv.modelopt_cfg:
        return _preset(mtq, kv.modelopt_cfg)["quant_cfg"]
    if kv.num_bits is None:
        return None
    attrs = {"num_bits": kv.num_bits, "axis": None}
    if isinstance(_preset(mtq, "FP8_KV_CFG")["quant_cfg"], Mapping):  # ModelOpt < 0.44
        return {KV_QUANTIZER: {**attrs, "enable": True}}
    return [{"quantizer_name": KV_QUANTIZER, "cfg": attrs, "enable": True}]


def _disable_all(like):
    return {"*": {"enable": False}} if isinstance(like, Mapping) else [{"quantizer_name": "*", "enable": False}]


def _with_kv(mtq, base: dict, fragment) -> dict:
    helper = getattr(mtq, "update_quant_cfg_with_kv_cache_quant", None)  # ModelOpt >= 0.44 exports it
    if helper is not None:
        return helper(base, fragment)
    inner = base["quant_cfg"]
    merged = {**inner, **fragment} if isinstance(inner, Mapping) else [*inner, *fragment]
    return {**base, "quant_cfg": merged}


def modelopt_quant_config(precision: str | PrecisionSpec, kv_cache: str | KVCacheSpec = "auto") -> dict | None:
    """The config for `mtq.quantize(model, cfg, forward_loop)`, or None when nothing is quantized.

    A fresh deep copy every call: ModelOpt's module-level presets are never modified.
    """
    p, kv = get_precision(precision), get_kv_cache(kv_cache)
    if not needs_calibration(p, kv):
        return None
    mtq = _mtq()
    base = _preset(mtq, p.modelopt_cfg) if p.modelopt_cfg else None
    fragment = _kv_fragment(mtq, kv)
    if fragment is None:
        return base
    if base is None:
        base = {"quant_cfg": _disable_all(fragment), "algorithm": "max"}
    return _with_kv(mtq, base, fragment)


# ModelOpt's TensorRT-LLM export (modelopt/torch/export/model_config_export.py,
# `torch_to_tensorrt_llm_checkpoint`; the same code in the 0.37.0 wheel and in 0.47.0) pads the
# vocab_embedding and lm_head of an INT4 AWQ / W4A8 AWQ model with zero rows to a multiple of 64
# (`postprocess.pad_embedding_lm_head`)
# and writes the padded size as config.json `vocab_size`. trtllm-build takes that as the engine's
# `pretrained_config.vocab_size`, and TensorRT-LLM's `PromptTuningEmbedding` reads every id >= it
# from the prompt table: the padded size is where fake ids start. The ids a model may generate stay
# below the model's vocab (`spec.text.vocab_size`); the rows between are zero and never used.
VOCAB_PAD_MULTIPLE = 64
VOCAB_PADDING_ALGOS = ("W4A16_AWQ", "W4A8_AWQ")


def engine_vocab_size(vocab_size: int, precision: str | PrecisionSpec) -> int:
    """vocab_size of the TensorRT-LLM checkpoint and engine for a model of `vocab_size` rows exported
    at `precision` (151672 -> 151680 for int4_awq; unchanged otherwise). Fake ids start there."""
    if get_precision(precision).quant_algo in VOCAB_PADDING_ALGOS:
        return -(-int(vocab_size) // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    return int(vocab_size)
