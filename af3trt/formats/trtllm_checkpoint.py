"""TensorRT-LLM Qwen2 checkpoints read back: the HF <-> TensorRT-LLM name mapping (with its inverse)
and `load_trtllm_checkpoint`, which merges TP ranks and dequantizes FP8 / INT8 / INT4-AWQ weights to
float32 HF Qwen2 tensors for the torch decoder backend and for tests.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from pathlib import Path

from ..spec import TextSpec


# --------------------------------------------------------------------------- name mapping

# HF Qwen2 name inside `model.layers.{n}.` -> TRT-LLM name inside `transformer.layers.{n}.`
# (TRT-LLM's swap: mlp.fc = HF gate_proj, mlp.gate = HF up_proj). q/k/v fuse into attention.qkv.
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_layernorm.weight",
    "self_attn.o_proj.weight": "attention.dense.weight",
    "mlp.gate_proj.weight": "mlp.fc.weight",
    "mlp.up_proj.weight": "mlp.gate.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}
QKV_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "transformer.vocab_embedding.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
INV_LAYER_NAMES = {v: k for k, v in LAYER_NAMES.items()}
INV_GLOBAL_NAMES = {v: k for k, v in GLOBAL_NAMES.items()}
COLUMN_PARALLEL = ("attention.qkv", "mlp.fc", "mlp.gate", "lm_head")  # TP split on dim 0 (outputs)
ROW_PARALLEL = ("attention.dense", "mlp.proj")  # TP split on dim 1 (inputs)
LINEARS = COLUMN_PARALLEL[:-1] + ROW_PARALLEL  # what trtllm-build quantizes for W8A16 / W4A16
_LINEAR_LEAVES = {m.rpartition(".")[2] for m in COLUMN_PARALLEL + ROW_PARALLEL}  # qkv, fc, ..., lm_head
SCALE_SUFFIXES = ("weights_scaling_factor", "activation_scaling_factor", "prequant_scaling_factor",
                  "kv_cache_scaling_factor", "k_cache_scaling_factor", "v_cache_scaling_factor")
_LAYER = re.compile(r"^(model|transformer)\.layers\.(\d+)\.(.+)$")


def hf_to_trtllm_names(state: Mapping) -> dict:
    """HF Qwen2 state dict -> TRT-LLM tp1 names (q/k/v concatenated on dim 0). Tensors are shared."""
    import torch

    out, qkv = {}, {}
    for name, t in state.items():
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = t
            continue
        m = _LAYER.match(name)
        if not m or m.group(1) != "model":
            raise KeyError(f"expected an HF Qwen2 name (model.layers.N..., {sorted(GLOBAL_NAMES)}), got {name!r}")
        n, rest = m.group(2), m.group(3)
        part, _, kind = rest.rpartition(".")
        if part in QKV_PARTS:
            qkv.setdefault((n, kind), {})[part] = t
        elif rest in LAYER_NAMES:
            out[f"transformer.layers.{n}.{LAYER_NAMES[rest]}"] = t
        else:
            raise KeyError(f"no TRT-LLM name for HF tensor {name!r}")
    for (n, kind), parts in qkv.items():
        if set(parts) != set(QKV_PARTS):
            raise KeyError(f"layer {n} {kind}: expected q/k/v_proj, got {sorted(parts)}")
        out[f"transformer.layers.{n}.attention.qkv.{kind}"] = torch.cat([parts[p] for p in QKV_PARTS], 0)
    return out


def trtllm_to_hf_names(state: Mapping, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    """Inverse of `hf_to_trtllm_names` for merged (tp1) tensors: splits attention.qkv into q/k/v."""
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    out = {}
    for name, t in state.items():
        if name in INV_GLOBAL_NAMES:
            out[INV_GLOBAL_NAMES[name]] = t
            continue
        m = _LAYER.match(name)
        if not m or m.group(1) != "transformer":
            raise KeyError(f"expected a TRT-LLM Qwen name (transformer.layers.N..., "
                           f"{sorted(INV_GLOBAL_NAMES)}), got {name!r}")
        n, rest = m.group(2), m.group(3)
        if rest.startswith("attention.qkv."):
            if t.shape[0] != sum(sizes):
                raise ValueError(f"{name}: expected {sum(sizes)} fused q/k/v rows, got {t.shape[0]}")
            kind = rest.rpartition(".")[2]
            for part, piece in zip(QKV_PARTS, t.split(sizes, 0)):
                out[f"model.layers.{n}.{part}.{kind}"] = piece
        elif rest in INV_LAYER_NAMES:
            out[f"model.layers.{n}.{INV_LAYER_NAMES[rest]}"] = t
        else:
            raise KeyError(f"no HF Qwen2 name for TRT-LLM tensor {name!r}")
    return out


# --------------------------------------------------------------------------- read back + dequantize


def text_spec(cfg: Mapping) -> TextSpec:
    """TextSpec of a TensorRT-LLM Qwen2 config.json (as written by `export_checkpoint`)."""
    heads = int(cfg["num_attention_heads"])
    return TextSpec(
        hidden_size=int(cfg["hidden_size"]), intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_size") or int(cfg["hidden_size"]) // heads), vocab_size=int(cfg["vocab_size"]),
        rope_theta=float(cfg.get("rotary_base", 10000.0)), rms_norm_eps=float(cfg.get("norm_epsilon", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), hidden_act=str(cfg.get("hidden_act", "silu")),
    )


def _unpack_int4(packed):
    """ModelOpt's packing: (out/2, in) bytes, low nibble = row 2k, high nibble = row 2k+1 -> (out, in) int."""
    import torch

    b = packed.view(torch.uint8).to(torch.int16)
    low, high = ((b & 0xF) ^ 8) - 8, ((b >> 4) ^ 8) - 8  # sign-extend the 4-bit two's complement
    return torch.stack([low, high], 1).reshape(-1, b.shape[1])


def _int8_weight_only(w, dtype):
    """What trtllm-build does to a float weight for W8A16: symmetric per-output-channel int8,
    scale = max|w| / 127 stored in the checkpoint dtype (symmetric_quantize_last_axis_of_batched_matrix)."""
    import torch

    w = w.float()
    scale = w.abs().amax(1, keepdim=True) / 127.0
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp(-128, 127)
    return q * scale.to(getattr(torch, dtype)).float()


def _weight_only_target(prefix: str, quant: Mapping) -> bool:
    """Whether trtllm-build quantizes `prefix.weight` for W8A16 (its linear list minus exclude_modules)."""
    name = prefix + ".weight"
    if any(fnmatch.fnmatchcase(name, pat) for pat in quant.get("exclude_modules") or ()):
        return False
    return prefix.rpartition("layers.")[2].split(".", 1)[-1] in LINEARS


def _dequantize_linear(t: Mapping, prefix: str, quant: Mapping, dtype: str):
    """float32 (out, in) weight that the engine multiplies with, pre-quant scale folded in."""
    import torch

    w = t[prefix + ".weight"]
    scale = t.get(prefix + ".weights_scaling_factor")
    pqs = t.get(prefix + ".prequant_scaling_factor")
    algo = quant.get("quant_algo")
    if w.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8) and scale is None:
        raise KeyError(f"{prefix}: {w.dtype} weight without {prefix}.weights_scaling_factor")
    if w.dtype == torch.float8_e4m3fn:
        out = w.float() * scale.float().reshape(-1, 1) if scale.numel() > 1 else w.float() * scale.float()
    elif w.dtype in (torch.int8, torch.uint8) and algo in ("W4A16_AWQ", "W4A8_AWQ"):
        q = _unpack_int4(w).float()
        out = q * scale.float().repeat_interleave(int(quant.get("group_size") or 128), 1)
    elif w.dtype in (torch.int8, torch.uint8):
        out = w.float() * scale.float().reshape(-1, 1)
    elif algo == "W8A16" and _weight_only_target(prefix, quant):
        out = _int8_weight_only(w, dtype)
    else:
        out = w.float()
    if pqs is not None:  # engine: W_q @ (x * pqs)  ==  (W_q * pqs[None, :]) @ x
        out = out * pqs.float().reshape(1, -1)
    return out


def _dequantize_rank(t: Mapping, quant: Mapping, dtype: str) -> dict:
    out = {}
    for name, value in t.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in SCALE_SUFFIXES:
            continue
        if leaf == "weight" and prefix.rpartition(".")[2] in _LINEAR_LEAVES:
            out[name] = _dequantize_linear(t, prefix, quant, dtype)
        else:
            out[name] = value.float()
    return out


def _merge_qkv(parts: list, text: TextSpec, tp: int):
    """Per-rank [q_r; k_r; v_r] -> [q; k; v]; KV heads duplicated over ranks (kv < tp) are kept once."""
    import torch

    hd, kv_rank = text.head_dim, max(1, text.num_kv_heads // tp)
    sizes = [text.num_heads // tp * hd, kv_rank * hd, kv_rank * hd]
    split = [p.split(sizes, 0) for p in parts]
    kv_ranks = range(tp) if text.num_kv_heads >= tp else range(0, tp, tp // text.num_kv_heads)
    q = torch.cat([s[0] for s in split], 0)
    k = torch.cat([split[r][1] for r in kv_ranks], 0)
    v = torch.cat([split[r][2] for r in kv_ranks], 0)
    return torch.cat([q, k, v], 0)


def _merge_ranks(ranks: list, cfg: Mapping, text: TextSpec) -> dict:
    import torch

    tp = len(ranks)
    if tp == 1:
        return ranks[0]
    emb_dim = int(cfg.get("embedding_sharding_dim", 0)) if cfg.get("use_parallel_embedding") else None
    out = {}
    for name in ranks[0]:
        parts = [r[name] for r in ranks]
        module = name.rpartition(".")[0]
        if module.endswith("attention.qkv"):
            out[name] = _merge_qkv(parts, text, tp)
        elif module.endswith(COLUMN_PARALLEL):
            out[name] = torch.cat(parts, 0)
        elif module.endswith(ROW_PARALLEL):
            out[name] = torch.cat(parts, 1)
        elif name == "transformer.vocab_embedding.weight" and emb_dim is not None:
            out[name] = torch.cat(parts, emb_dim)
        else:
            if any(not torch.equal(parts[0], x) for x in parts[1:]):
                raise ValueError(f"{name}: expected identical replicated tensors over {tp} ranks, they differ")
            out[name] = parts[0]
    return out


def load_trtllm_checkpoint(ckpt_dir) -> tuple[dict, dict]:
    """TensorRT-LLM Qwen2 checkpoint -> (config.json dict, float32 HF Qwen2 state dict).

    TP ranks are merged (column-parallel on dim 0, row-parallel on dim 1, fused q/k/v per rank).
    Weights are dequantized to exactly what the engine multiplies with: FP8 per-tensor scales, INT8
    per-channel scales (SmoothQuant and ModelOpt weight-only), INT4 AWQ nibbles with group scales,
    the simulated per-channel INT8 that trtllm-build applies to float W8A16 weights, and every
    activation pre-quant scale (SmoothQuant/AWQ smoothing) folded into the weight's input columns.
    NOT simulated: activation quantization (FP8 / INT8 SmoothQuant static input scales) and KV-cache
    quantization; their scales are dropped, so outputs differ from the engine by that rounding only.
    """
    from safetensors.torch import load_file

    path = Path(ckpt_dir)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"expected a TensorRT-LLM checkpoint with config.json in {path}, found none")
    cfg = json.loads(cfg_file.read_text())
    mapping = cfg.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    if pp != 1 or int(mapping.get("world_size", tp)) != tp:
        raise ValueError(f"expected a tensor-parallel-only checkpoint (pp_size 1, world_size == tp_size), "
                         f"got {mapping}")
    files = [path / f"rank{r}.safetensors" for r in range(tp)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"tp_size {tp}: expected {[f.name for f in files]} in {path}, missing {missing}")
    quant, dtype, text = cfg.get("quantization") or {}, cfg.get("dtype", "bfloat16"), text_spec(cfg)
    merged = _merge_ranks([_dequantize_rank(load_file(str(f)), quant, dtype) for f in files], cfg, text)
    for name in ("transformer.vocab_embedding.weight", "lm_head.weight"):  # TP may pad the vocab
        if name in merged:
            if merged[name].shape[0] < text.vocab_size:
                raise ValueError(f"{name}: expected >= {text.vocab_size} rows, got {merged[name].shape[0]}")
            merged[name] = merged[name][: text.vocab_size]
    state = trtllm_to_hf_names(merged, text.num_heads, text.num_kv_heads, text.head_dim)
    expected = set(_hf_names(text))
    if set(state) != expected:
        raise KeyError(f"{path}: HF Qwen2 names missing {sorted(expected - set(state))[:8]}, "
                       f"unexpected {sorted(set(state) - expected)[:8]}")
    return cfg, state


def _hf_names(text: TextSpec) -> list[str]:
    """Every HF Qwen2 tensor name of `text` (q/k/v with bias, untied lm_head unless tied)."""
    names = [k for k in GLOBAL_NAMES if not (k == "lm_head.weight" and text.tie_word_embeddings)]
    for n in range(text.num_layers):
        names += [f"model.layers.{n}.{k}" for k in LAYER_NAMES]
        names += [f"model.layers.{n}.{p}.{kind}" for p in QKV_PARTS for kind in ("weight", "bias")]
    return names
