"""Decoder stage: AF3's Qwen2 LM -> ModelOpt quantization -> TensorRT-LLM checkpoint -> trtllm-build.

`export_checkpoint(...)` writes `config.json` + `rank{r}.safetensors` (ModelOpt's TRT-LLM export,
config post-fixed the way TensorRT-LLM's `quantize_by_modelopt.py` does for Qwen);
`trtllm_build_command(...)` is the exact, validated `trtllm-build` argv for it;
reading such a checkpoint back (`load_trtllm_checkpoint`) lives in trtllm_checkpoint.py.
modelopt / transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import fileio
from ..checkpoint import LM_PREFIX, Checkpoint
from ..errors import OptionError
from ..spec import MAX_AUDIO_SECONDS, ModelSpec, TextSpec, audio_tokens_for_seconds
from ..formats.limits import check_limit_fields
from ..formats.precision import (
    KVCacheSpec, PrecisionSpec, engine_vocab_size, get_kv_cache, get_precision, needs_calibration, resolve_dtype,
    trtllm_quantization,
)
from .precision import modelopt_quant_config
from ..formats.trtllm_checkpoint import GLOBAL_NAMES, LAYER_NAMES, LINEARS
from .stage_log import progress
from .trtllm_flags import build_argv

DECODER_TYPE = "qwen"  # ModelOpt's decoder_type for Qwen/Qwen2 (MODEL_NAME_TO_TYPE "QWen" -> "qwen")


# --------------------------------------------------------------------------- engine limits / argv


@dataclass(frozen=True)
class EngineLimits:
    """Engine-wide sizes, derived once from per-request limits.

    max_batch_size: concurrent requests; max_audio_seconds: audio per request (<= 600 s = 20 windows);
    max_text_tokens: prompt tokens besides audio (template, system prompt, question, earlier turns);
    max_new_tokens: generated tokens per request; max_num_tokens: tokens one engine step may hold
    (None = max_input_len, so a full 10-minute prompt needs no chunked context).
    """

    max_batch_size: int = 1
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    max_text_tokens: int = 2048
    max_new_tokens: int = 2048
    max_num_tokens: int | None = None

    def __post_init__(self):
        check_limit_fields("EngineLimits", self, ("max_batch_size", "max_text_tokens", "max_new_tokens"))
        if self.max_num_tokens is not None and not (isinstance(self.max_num_tokens, int) and self.max_num_tokens >= 1):
            raise OptionError(f"EngineLimits.max_num_tokens must be None or an int >= 1, got {self.max_num_tokens!r}")

    @property
    def audio_tokens_per_request(self) -> int:
        """Prompt-table rows of the longest audio (15,000 for 10 minutes)."""
        return audio_tokens_for_seconds(self.max_audio_seconds)

    @property
    def max_input_len(self) -> int:
        return self.audio_tokens_per_request + self.max_text_tokens

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_new_tokens

    @property
    def prompt_table_size(self) -> int:
        """--max_prompt_embedding_table_size: rows per request x max_batch_size (engine-wide)."""
        return self.audio_tokens_per_request * self.max_batch_size

    @property
    def num_tokens(self) -> int:
        return self.max_num_tokens or self.max_input_len


def trtllm_build_command(checkpoint_dir, output_dir, limits: EngineLimits, precision,
                         kv_cache: str | KVCacheSpec = "auto") -> list[str]:
    """The exact `trtllm-build` argv (list of str) for a checkpoint from `export_checkpoint`.

    Paged KV cache with paged context FMHA (KV reuse + chunked context possible at run time),
    packed inputs, prompt tables sized by `limits`; FP8 context FMHA only for the fp8 precision.
    Every flag and value is checked against the pinned flag table (trtllm_flags.py).
    """
    p, _ = get_precision(precision), get_kv_cache(kv_cache)
    return build_argv({
        "checkpoint_dir": str(checkpoint_dir), "output_dir": str(output_dir),
        "max_batch_size": limits.max_batch_size, "max_input_len": limits.max_input_len,
        "max_seq_len": limits.max_seq_len, "max_num_tokens": limits.num_tokens, "max_beam_width": 1,
        "max_prompt_embedding_table_size": limits.prompt_table_size,
        "gemm_plugin": "auto", "gpt_attention_plugin": "auto", "kv_cache_type": "paged",
        "use_paged_context_fmha": "enable", "remove_input_padding": "enable", "context_fmha": "enable",
        "use_fp8_context_fmha": "enable" if p.fp8_context_fmha else "disable",
    })


# --------------------------------------------------------------------------- HF model + quantization


def qwen2_config(text: TextSpec, dtype: str = "float32"):
    """transformers.Qwen2Config of a TextSpec (AF3 text_config or a TRT-LLM config, see `text_spec`)."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads, head_dim=text.head_dim, hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta, tie_word_embeddings=text.tie_word_embeddings,
        use_sliding_window=False, architectures=["Qwen2ForCausalLM"],
    )
    cfg.rope_theta = text.rope_theta  # transformers 5 keeps it in rope_parameters; ModelOpt reads the attribute
    return cfg


def build_qwen2(text: TextSpec, state: Mapping, dtype: str = "float32", device="cpu"):
    """`transformers.Qwen2ForCausalLM` holding `state` (HF names), without a random init pass."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch_dtype = getattr(torch, dtype)
    config = qwen2_config(text, dtype)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    if text.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected, got = set(model.state_dict()), set(state)
    if expected != got:
        raise KeyError(f"Qwen2 weights: missing {sorted(expected - got)[:8]}, unexpected {sorted(got - expected)[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    with torch.device("cpu"):  # non-persistent rotary buffers are rebuilt, not loaded
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"Qwen2 tensors left uninitialized (meta): {meta[:8]}")
    return model.to(device).eval()


def load_qwen2_from_af3(checkpoint_dir, dtype: str = "bfloat16", device="cpu"):
    """AF3 checkpoint dir or `Checkpoint` (`language_model.model.*`, `language_model.lm_head.weight`) -> Qwen2ForCausalLM."""
    import torch


    ckpt = checkpoint_dir if isinstance(checkpoint_dir, Checkpoint) else Checkpoint.open(checkpoint_dir)
    state = ckpt.load(LM_PREFIX, dtype=getattr(torch, dtype))
    return build_qwen2(ckpt.spec.text, state, dtype, device)


def _calibration_list(batches: Iterable, hidden: int) -> list:
    import torch

    batches = batches if isinstance(batches, (list, tuple)) else list(batches)  # ModelOpt may loop twice
    if not batches:
        raise ValueError("expected at least one calibration batch, got none")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or not {"inputs_embeds", "attention_mask"} <= set(b):
            got = sorted(b) if isinstance(b, Mapping) else type(b).__name__
            raise ValueError(f"calibration batch {i}: expected keys inputs_embeds, attention_mask, got {got}")
        e, m = b["inputs_embeds"], b["attention_mask"]
        if not (torch.is_tensor(e) and e.is_floating_point() and e.dim() == 3 and e.shape[-1] == hidden):
            raise ValueError(f"calibration batch {i}: expected inputs_embeds float [B, T, {hidden}], "
                             f"got {getattr(e, 'dtype', type(e))} {tuple(getattr(e, 'shape', ()))}")
        if not (torch.is_tensor(m) and tuple(m.shape) == tuple(e.shape[:2])):
            raise ValueError(f"calibration batch {i}: expected attention_mask {tuple(e.shape[:2])}, "
                             f"got {tuple(getattr(m, 'shape', ()))}")
    return batches


def quantize_lm(model, precision, kv_cache="auto", calib_batches: Iterable | None = None):
    """Apply the precision's ModelOpt config in place with `mtq.quantize`; no-op for bf16/fp16/int8_wo.

    calib_batches: iterable of {"inputs_embeds": float [B, T, hidden], "attention_mask": [B, T]}
    (audio-aware prompts: text embeddings with the audio rows spliced in).
    """
    import torch

    p, kv = get_precision(precision), get_kv_cache(kv_cache)
    cfg = modelopt_quant_config(p, kv)
    if cfg is None:
        return model
    if calib_batches is None:
        raise ValueError(f"precision {p.name!r} with KV cache {kv.name!r} needs calib_batches "
                         "(iterable of {inputs_embeds, attention_mask}), got None")
    batches = _calibration_list(calib_batches, model.config.hidden_size)
    param = next(model.parameters())

    def forward_loop(m):
        with torch.no_grad():
            for b in progress(batches, f"llm_checkpoint: {p.name} calibration", unit="prompt"):
                m(inputs_embeds=b["inputs_embeds"].to(param.device, param.dtype),
                  attention_mask=b["attention_mask"].to(param.device), use_cache=False)

    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, cfg, forward_loop)


# --------------------------------------------------------------------------- export


def _check_tp(text: TextSpec, p: PrecisionSpec, tp_size: int) -> None:
    if not isinstance(tp_size, int) or tp_size < 1:
        raise OptionError(f"tp_size must be an int >= 1, got {tp_size!r}")
    kv = text.num_kv_heads
    checks = {"num_attention_heads": text.num_heads, "intermediate_size": text.intermediate_size}
    for name, value in checks.items():
        if value % tp_size:
            raise OptionError(f"{name} {value} must divide by tp_size, got tp_size {tp_size}")
    if kv % tp_size and tp_size % kv:
        raise OptionError(f"num_key_value_heads {kv} and tp_size {tp_size}: expected one to divide the other")
    if p.quant_algo == "W4A16_AWQ":
        widths = {"hidden_size": text.hidden_size, "attention width / tp": text.num_heads * text.head_dim // tp_size,
                  "intermediate_size / tp": text.intermediate_size // tp_size}
        bad = {k: v for k, v in widths.items() if v % p.group_size}
        if bad:
            raise OptionError(f"INT4 AWQ needs linear input widths divisible by group_size {p.group_size}, got {bad}")


def _postfix_config(path: Path, text: TextSpec, p: PrecisionSpec, kv: KVCacheSpec, dtype: str, tp_size: int) -> dict:
    """Check what ModelOpt wrote, then set the fields TensorRT-LLM's QWen loader reads (qwen flow)."""
    cfg = json.loads((path / "config.json").read_text())
    got = cfg.get("quantization") or {}
    expect = trtllm_quantization(p, kv)
    checks = {"quant_algo": p.exported_quant_algo, "kv_cache_quant_algo": kv.kv_cache_quant_algo}
    if p.exported_quant_algo:
        checks.update({k: expect[k] for k in ("group_size", "has_zero_point", "pre_quant_scale") if k in got})
        checks["exclude_modules"] = sorted(p.exclude_modules or ())
        got = {**got, "exclude_modules": sorted(got.get("exclude_modules") or ())}
    wrong = {k: (v, got.get(k)) for k, v in checks.items() if got.get(k) != v}
    dims = {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_layers,
            "vocab_size": engine_vocab_size(text.vocab_size, p),
            "num_attention_heads": text.num_heads, "num_key_value_heads": text.num_kv_heads}
    wrong.update({k: (v, cfg.get(k)) for k, v in dims.items() if cfg.get(k) != v})
    if (cfg.get("mapping") or {}).get("tp_size") != tp_size:
        wrong["mapping.tp_size"] = (tp_size, (cfg.get("mapping") or {}).get("tp_size"))
    if wrong:
        raise RuntimeError(f"ModelOpt export disagrees with precision {p.name!r}/{kv.name!r} "
                           f"(field: (expected, got)): {wrong}")
    cfg.update(
        architecture="Qwen2ForCausalLM", qwen_type="qwen2", dtype=dtype, logits_dtype="float32",
        head_size=text.head_dim, intermediate_size=text.intermediate_size, hidden_act=text.hidden_act,
        norm_epsilon=text.rms_norm_eps, max_position_embeddings=text.max_position_embeddings,
        position_embedding_type="rope_gpt_neox", rotary_base=text.rope_theta, rotary_scaling=None,
        attn_bias=True, mlp_bias=False, tie_word_embeddings=text.tie_word_embeddings, quantization=expect,
    )
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    extra = path / "quant_cfg.json"  # ModelOpt leaves an empty mixed-precision map for unquantized TP exports
    if extra.exists():
        if json.loads(extra.read_text()).get("quantized_layers"):
            raise RuntimeError(f"unexpected per-layer (mixed precision) quantization in {extra}")
        extra.unlink()
    return cfg


def _verify_export(path: Path, cfg: dict, p: PrecisionSpec, kv: KVCacheSpec) -> None:
    from safetensors import safe_open

    tp = cfg["mapping"]["tp_size"]
    ranks = sorted(f.name for f in path.glob("rank*.safetensors"))
    if ranks != sorted(f"rank{r}.safetensors" for r in range(tp)):
        raise RuntimeError(f"expected rank0..rank{tp - 1}.safetensors in {path}, got {ranks}")
    need = set(GLOBAL_NAMES.values())
    for n in range(cfg["num_hidden_layers"]):
        pre = f"transformer.layers.{n}."
        need |= {pre + v for v in LAYER_NAMES.values()} | {pre + "attention.qkv.weight", pre + "attention.qkv.bias"}
        if p.exported_quant_algo:
            need |= {f"{pre}{lin}.weights_scaling_factor" for lin in LINEARS}
        if kv.kv_cache_quant_algo:
            need.add(pre + "attention.kv_cache_scaling_factor")
    for r in range(tp):
        with safe_open(str(path / f"rank{r}.safetensors"), framework="pt") as f:
            missing = need - set(f.keys())
            rows = {n: f.get_slice(n).get_shape()[0] for n in ("transformer.vocab_embedding.weight",)
                    if n in f.keys()}
        if tp == 1 and any(v != cfg["vocab_size"] for v in rows.values()):
            raise RuntimeError(f"rank0.safetensors: expected {cfg['vocab_size']} vocab rows (config.json "
                               f"vocab_size), got {rows}")
        if missing:
            raise RuntimeError(f"rank{r}.safetensors lacks {len(missing)} expected tensors, e.g. {sorted(missing)[:6]}")


@contextlib.contextmanager
def _qwen_config_without_tensorrt_llm():
    """ModelOpt 0.37 (the TensorRT-LLM 1.2 containers' pin) builds a Qwen config.json only through
    tensorrt_llm's QWenConfig; where tensorrt_llm is not installed (CI, a CPU build) its manual fallback
    (`tensorrt_llm_utils.convert_to_tensorrt_llm_config`) raises NotImplementedError for decoder "qwen",
    while that fallback's generic decoder-only branch ("gpt", "gemma", "llama": no extra field) is what
    a Qwen2 config needs; ModelOpt 0.47's fallback handles qwen itself. Here, only on that error, the
    config is built through the generic branch; `_postfix_config` then sets and checks every field
    TensorRT-LLM's Qwen loader reads (architecture, qwen_type, rotary base, biases, quantization)."""
    from modelopt.torch.export import model_config_export as mce

    original = mce.convert_to_tensorrt_llm_config

    def convert(model_config, *args, **kwargs):
        try:
            return original(model_config, *args, **kwargs)
        except NotImplementedError:
            first = model_config.layers[0]
            if first.decoder_type != DECODER_TYPE:
                raise
            first.decoder_type = "llama"
            try:
                config = original(model_config, *args, **kwargs)
            finally:
                first.decoder_type = DECODER_TYPE
            config["decoder"] = DECODER_TYPE
            return config

    mce.convert_to_tensorrt_llm_config = convert
    try:
        yield
    finally:
        mce.convert_to_tensorrt_llm_config = original


def export_checkpoint(*, checkpoint_dir, out_dir, precision, kv_cache="auto", tp_size: int = 1,
                      calib_batches: Iterable | None = None, dtype: str | None = None, device=None) -> Path:
    """AF3 checkpoint -> TensorRT-LLM checkpoint (`config.json` + `rank{r}.safetensors`) at `out_dir`.

    checkpoint_dir: an AF3 checkpoint dir, or a `Checkpoint` (`af3trt.think.open_checkpoint` for a variant).
    precision: a name of `precision.PRECISIONS`; kv_cache: auto|fp8|int8; calib_batches: see
    `quantize_lm` (required whenever ModelOpt calibrates); dtype: unquantized tensors (bf16/fp16
    precisions fix it; default bfloat16); device: where calibration runs (default cuda if available).
    Written into a temporary sibling folder and renamed into place when verified.
    """
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    p, kv = get_precision(precision), get_kv_cache(kv_cache)
    dtype = resolve_dtype(p, dtype)
    spec = getattr(checkpoint_dir, "spec", None) or ModelSpec.from_dir(checkpoint_dir)  # a Checkpoint, or its dir
    _check_tp(spec.text, p, tp_size)
    if needs_calibration(p, kv) and calib_batches is None:
        raise ValueError(f"precision {p.name!r} with KV cache {kv.name!r} needs calib_batches, got None")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_qwen2_from_af3(checkpoint_dir, dtype, device)
    quantize_lm(model, p, kv, calib_batches)
    out = Path(out_dir)
    with fileio.staged_dir(out) as tmp:  # ModelOpt writes rank*.safetensors 0600: staged_dir fixes the modes
        with _qwen_config_without_tensorrt_llm():
            export_tensorrt_llm_checkpoint(model, DECODER_TYPE, getattr(torch, dtype), export_dir=tmp,
                                           inference_tensor_parallel=tp_size)
        cfg = _postfix_config(tmp, spec.text, p, kv, dtype, tp_size)
        _verify_export(tmp, cfg, p, kv)
    return out

