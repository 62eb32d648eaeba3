"""ModelOpt's side of the decoder precisions: `modelopt_quant_config(precision, kv_cache)`.

The registry (`PRECISIONS`, `KV_CACHES`, the TensorRT-LLM `quantization` block) is
`af3trt.formats.precision`; each `PrecisionSpec.modelopt_cfg` names the ModelOpt config, by its
attribute name on `modelopt.torch.quantization`, that `mtq.quantize` applies before export. The
KV-cache spec is combined with it through ModelOpt's own helper when the installed ModelOpt has one;
configs are never edited entry by entry, since the ModelOpt pinned by TensorRT-LLM 1.2 containers
(0.37) stores `quant_cfg` as a dict and ModelOpt >= 0.44 as a list.

INT8 weight-only follows TensorRT-LLM's own ModelOpt flow (`quantize_by_modelopt.py`: `"int8_wo":
EMPTY_CFG`): ModelOpt leaves the weights in float, config.json says `W8A16`, and trtllm-build
quantizes them per output channel when it loads the checkpoint. A checkpoint with ModelOpt-int8
weights would carry `weights_scaling_factor`, which TensorRT-LLM's W8A16 loader does not read (it
expects `per_channel_scale` in its own packed layout).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from ..formats.precision import KVCacheSpec, PrecisionSpec, get_kv_cache, get_precision, needs_calibration

KV_QUANTIZER = "*[kv]_bmm_quantizer"  # ModelOpt's K/V quantizers on attention (FP8_KV_CFG uses it too)


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
