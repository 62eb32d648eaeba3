"""Decoder precisions and KV-cache formats: the one registry (build, floors, labels, CLI choices).

Each `PrecisionSpec` names the ModelOpt config `af3trt.build.precision` applies and the `quantization`
block TensorRT-LLM reads from the checkpoint's config.json (shared/reference/trtllm.md §2.1, §2.3,
§2.4b); `engine_vocab_size` is the padded vocab where fake ids start. Torch-free; ModelOpt lives in
`af3trt.build.precision`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import OptionError

DTYPES = ("bfloat16", "float16")  # `--dtype` of a decoder build (names of af3trt.dtypes.DTYPES)


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


def _get(registry: Mapping, cls: type, name, what: str):
    if isinstance(name, cls):
        return name
    if name not in registry:
        raise OptionError(f"unknown {what} {name!r}; expected one of {sorted(registry)}")
    return registry[name]


def get_precision(name: "str | PrecisionSpec") -> PrecisionSpec:
    """The registered precision `name`; ValueError naming the valid ones otherwise."""
    return _get(PRECISIONS, PrecisionSpec, name, "decoder precision")


def get_kv_cache(name: "str | KVCacheSpec") -> KVCacheSpec:
    """The registered KV-cache format `name`; ValueError naming the valid ones otherwise."""
    return _get(KV_CACHES, KVCacheSpec, name, "KV-cache format")


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
        return padded_vocab_size(vocab_size)
    return int(vocab_size)


def padded_vocab_size(vocab_size: int) -> int:
    """`vocab_size` rounded up to ModelOpt's VOCAB_PAD_MULTIPLE (151672 -> 151680)."""
    return -(-int(vocab_size) // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
