"""FP8 TensorRT-LLM Qwen2 checkpoints read back *without* dequantizing: HF-named float8_e4m3fn
weights plus their `weights_scaling_factor`, for the fast torch decoder's FP8 path.

`formats.trtllm_checkpoint.load_trtllm_checkpoint` turns every weight into float32 (what the engine
multiplies with); here the FP8 bytes stay FP8 so that decode reads half the bytes of bf16. The name
mapping is that module's (`trtllm_to_hf_names`); only the scales need their own mapping because
the fused `attention.qkv` weight carries ONE scale that q, k and v then share.

Tensor parallel size 1 only (`rank0.safetensors`): the fast decoder runs on one GPU, and merging
FP8 ranks whose scales differ would need a re-quantization this loader must not do silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.trtllm_checkpoint import INV_LAYER_NAMES, QKV_PARTS, _LAYER, _hf_names, text_spec, trtllm_to_hf_names
from ..spec import TextSpec

WEIGHT_SCALE = "weights_scaling_factor"
# Dropped on purpose: static activation scales (the decode path is weight-only FP8, and prefill
# quantizes activations per call) and KV-cache scales (the fast decoder keeps a bf16 cache).
IGNORED_SCALES = ("activation_scaling_factor", "prequant_scaling_factor", "kv_cache_scaling_factor",
                  "k_cache_scaling_factor", "v_cache_scaling_factor")


@dataclass
class Fp8Checkpoint:
    """An FP8 TensorRT-LLM checkpoint in HF Qwen2 names.

    weights: every HF tensor (`model.layers.0.self_attn.q_proj.weight`, ...); quantized linears are
    float8_e4m3fn (N, K), the rest (embedding, norms, biases, excluded modules such as lm_head)
    keep the checkpoint dtype. scales: HF weight name -> float32 (1,) per-tensor or (N,)
    per-channel scale, one entry per float8 weight: `w ~= weights[name].float() * scales[name]`.
    """

    config: dict
    text: TextSpec
    weights: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]


def _split_scale(name: str, scale: torch.Tensor, text: TextSpec) -> dict[str, torch.Tensor]:
    """Scale of a TRT-LLM weight -> {HF weight name: scale}; q/k/v share (or split) the qkv scale."""
    m = _LAYER.match(name)
    if not m:  # a global tensor such as lm_head.weight: the weight mapping names it
        hf = trtllm_to_hf_names({name: scale}, text.num_heads, text.num_kv_heads, text.head_dim)
        return {k: v.float().reshape(-1) for k, v in hf.items()}
    layer, rest = m.group(2), m.group(3)
    scale = scale.float().reshape(-1)
    if rest == "attention.qkv.weight":
        hd = text.head_dim
        sizes = [text.num_heads * hd, text.num_kv_heads * hd, text.num_kv_heads * hd]
        parts = scale.split(sizes) if scale.numel() == sum(sizes) else [scale] * 3
        return {f"model.layers.{layer}.{p}.weight": s.clone() for p, s in zip(QKV_PARTS, parts)}
    if rest in INV_LAYER_NAMES:
        return {f"model.layers.{layer}.{INV_LAYER_NAMES[rest]}": scale}
    raise KeyError(f"no HF Qwen2 name for the scale of TRT-LLM tensor {name!r}")


def load_fp8_trtllm_checkpoint(ckpt_dir) -> Fp8Checkpoint:
    """Read an FP8 (`quant_algo` "FP8") tp1 TensorRT-LLM Qwen2 checkpoint, keeping the FP8 weights.

    Raises ValueError for another quantization or TP > 1, KeyError for a float8 weight without its
    scale or a scale whose weight is not float8, FileNotFoundError for missing files.
    """
    from safetensors.torch import load_file

    path = Path(ckpt_dir)
    cfg_file, rank0 = path / "config.json", path / "rank0.safetensors"
    for f in (cfg_file, rank0):
        if not f.is_file():
            raise FileNotFoundError(f"expected a TensorRT-LLM checkpoint with {f.name} in {path}, found none")
    cfg = json.loads(cfg_file.read_text())
    algo = (cfg.get("quantization") or {}).get("quant_algo")
    if algo != "FP8":
        raise ValueError(f"{path}: expected quantization.quant_algo 'FP8', got {algo!r}")
    mapping = cfg.get("mapping") or {}
    if int(mapping.get("tp_size", 1)) != 1 or int(mapping.get("pp_size", 1)) != 1:
        raise ValueError(f"{path}: expected a tp_size 1, pp_size 1 checkpoint (one GPU), got {mapping}")
    text = text_spec(cfg)
    raw = load_file(str(rank0))
    tensors, scales = {}, {}
    for name, t in raw.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == WEIGHT_SCALE:
            weight = raw.get(prefix + ".weight")
            if weight is None or weight.dtype != torch.float8_e4m3fn:
                raise KeyError(f"{name}: expected a float8_e4m3fn {prefix}.weight beside it, got "
                               f"{None if weight is None else weight.dtype}")
            scales.update(_split_scale(prefix + ".weight", t, text))
        elif leaf not in IGNORED_SCALES:
            tensors[name] = t
    for name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
        if name in tensors and tensors[name].shape[0] > text.vocab_size:
            tensors[name] = tensors[name][: text.vocab_size]  # padded vocab rows are never read
    weights = trtllm_to_hf_names(tensors, text.num_heads, text.num_kv_heads, text.head_dim)
    expected = set(_hf_names(text))
    if set(weights) != expected:
        raise KeyError(f"{path}: HF Qwen2 names missing {sorted(expected - set(weights))[:8]}, "
                       f"unexpected {sorted(set(weights) - expected)[:8]}")
    unscaled = sorted(k for k, w in weights.items() if w.dtype == torch.float8_e4m3fn and k not in scales)
    if unscaled:
        raise KeyError(f"{path}: float8 weights without {WEIGHT_SCALE}: {unscaled[:8]}")
    return Fp8Checkpoint(cfg, text, weights, scales)
