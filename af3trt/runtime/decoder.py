"""Torch Qwen2 decoder with a KV cache that reads token ids >= vocab_size from a prompt table.

Weights use HF Qwen2 names (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`, ...): from an
AF3 checkpoint (`language_model.*`) or, dequantized, from a TensorRT-LLM checkpoint. The lookup of
fake ids is TensorRT-LLM's prompt-tuning contract (DESIGN §4): id >= vocab_size reads row
`id - vocab_size + offset` of the batch's concatenated table, `offset` being the request's first row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import LM_PREFIX
from ..formats.precision import VOCAB_PAD_MULTIPLE, padded_vocab_size
from ..formats.trtllm_checkpoint import load_trtllm_checkpoint, text_spec
from ..prompt import left_pad
from ..spec import TextSpec
from .generation import decode_loop, in_inference_mode


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(t: TextSpec, device=None) -> torch.Tensor:
    """(head_dim // 2,) float32 RoPE inverse frequencies (default rope, theta from the config)."""
    exponent = torch.arange(0, t.head_dim, 2, dtype=torch.int64, device=device).float() / t.head_dim
    return 1.0 / (t.rope_theta ** exponent)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(nn.Module):
    def __init__(self, t: TextSpec):
        super().__init__()
        self.t = t
        q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(t.hidden_size, q, bias=True)
        self.self_attn.k_proj = nn.Linear(t.hidden_size, kv, bias=True)
        self.self_attn.v_proj = nn.Linear(t.hidden_size, kv, bias=True)
        self.self_attn.o_proj = nn.Linear(q, t.hidden_size, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(t.intermediate_size, t.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)

    def forward(self, x, cos, sin, cache_k, cache_v, start: int, bias):
        """x (B, T, H); cos/sin (B, 1, T, hd); cache_* (B, kvh, L, hd) written at [start, start+T)."""
        b, n, _ = x.shape
        t, a = self.t, self.self_attn
        h = self.input_layernorm(x)
        q = a.q_proj(h).view(b, n, t.num_heads, t.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, n, t.num_kv_heads, t.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, n, t.num_kv_heads, t.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache_k[:, :, start : start + n] = k
        cache_v[:, :, start : start + n] = v
        keys, values = cache_k[:, :, : start + n], cache_v[:, :, : start + n]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, is_causal=bias is None and n > 1,
                                           enable_gqa=t.num_heads != t.num_kv_heads)
        x = x + a.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        h = self.post_attention_layernorm(x)
        m = self.mlp
        return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


class Qwen2Decoder(nn.Module):
    """Qwen2 causal LM (HF names under `model.` and `lm_head`), with prompt-table embedding lookup."""

    def __init__(self, t: TextSpec):
        super().__init__()
        if t.hidden_act != "silu":
            raise ValueError(f"expected Qwen2's 'silu' activation, got {t.hidden_act!r}")
        self.t = t
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.model.layers = nn.ModuleList(Layer(t) for _ in range(t.num_layers))
        self.model.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # float32 always: not a buffer, so .to(bf16) keeps it

    def inv_freq(self, device) -> torch.Tensor:
        inv = self._inv_freq.get(device)
        if inv is None:
            inv = self._inv_freq[device] = rope_inv_freq(self.t, device)
        return inv

    def load_hf_state_dict(self, state: dict) -> "Qwen2Decoder":
        state = dict(state)
        if self.t.tie_word_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        self.load_state_dict(state, strict=True)
        return self

    def embed(self, ids: torch.Tensor, table: torch.Tensor | None, offsets: torch.Tensor | None) -> torch.Tensor:
        """ids (B, T) with fake ids; table (R, H) rows of all requests; offsets (B,) first row per request."""
        vocab = self.t.vocab_size
        fake = ids >= vocab
        x = self.model.embed_tokens(ids.masked_fill(fake, 0))
        if bool(fake.any()):
            if table is None:
                raise ValueError(f"ids >= vocab_size {vocab} need a prompt table, got none")
            rows = ids - vocab + (offsets[:, None] if offsets is not None else 0)
            x[fake] = table[rows[fake]].to(x.dtype)
        return x

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(self, x, positions, cache, start: int, bias, last_only: bool = True):
        """x (B, T, H) input embeddings -> logits (B, V) of the last position (or (B, T, V))."""
        cos, sin = self.rope(positions, x.dtype)
        for layer, (ck, cv) in zip(self.model.layers, cache):
            x = layer(x, cos, sin, ck, cv, start, bias)
        x = self.model.norm(x[:, -1:] if last_only else x)
        logits = self.lm_head(x).float()
        return logits[:, -1] if last_only else logits

    def new_cache(self, batch: int, length: int, dtype, device):
        t = self.t
        shape = (batch, t.num_kv_heads, length, t.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(t.num_layers)]


def check_valid_vocab(valid_vocab: int | None, rows: int) -> int:
    """The ids a decoder may generate: `valid_vocab` (the model's vocab) <= its `rows` (None = all)."""
    if valid_vocab is None:
        return rows
    if not 0 < valid_vocab <= rows:
        raise ValueError(f"expected a valid vocab in (0, {rows}] (the lm_head's rows), got {valid_vocab}")
    return int(valid_vocab)


def check_trtllm_text(text: TextSpec, spec, ckpt_dir) -> None:
    """A TensorRT-LLM checkpoint's TextSpec against the AF3 config's: same dims, and a vocab of at
    least the model's (more only where the export padded it, `formats.precision.engine_vocab_size`)."""
    if spec is None:
        return
    want = spec.text
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(text, field) != getattr(want, field):
            raise ValueError(f"TensorRT-LLM checkpoint {ckpt_dir}: {field} {getattr(text, field)}, "
                             f"the AF3 config says {getattr(want, field)}")
    padded = padded_vocab_size(want.vocab_size)
    if text.vocab_size not in (want.vocab_size, padded):
        raise ValueError(f"TensorRT-LLM checkpoint {ckpt_dir}: vocab_size {text.vocab_size}, expected the AF3 "
                         f"config's {want.vocab_size} or it padded to a multiple of {VOCAB_PAD_MULTIPLE} ({padded})")


def attention_bias(key_mask: torch.Tensor, queries: int, start: int, dtype) -> torch.Tensor | None:
    """(B, 1, queries, start+queries) additive mask: causal within the step and padding keys masked.

    None when no key is padding: attention is then plain causal (SDPA's fused `is_causal` path).
    """
    if bool(key_mask.all()):
        return None
    b, keys = key_mask.shape
    q_pos = torch.arange(start, start + queries, device=key_mask.device)
    k_pos = torch.arange(keys, device=key_mask.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_mask[:, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


class TorchDecoder:
    """Decoder backend on af3trt's torch Qwen2. `steps(...)` yields the next ids of each step."""

    name = "torch"

    def __init__(self, module: Qwen2Decoder, device="cpu", valid_vocab: int | None = None):
        self.module = module.to(device).eval()
        self.device = torch.device(device)
        self.dtype = next(module.parameters()).dtype
        self.spec = module.t
        self.vocab_size = module.t.vocab_size  # embedding rows: fake ids start here
        self.valid_vocab = check_valid_vocab(valid_vocab, self.vocab_size)

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu", dtype=torch.float32) -> "TorchDecoder":
        module = Qwen2Decoder(ckpt.spec.text).load_hf_state_dict(ckpt.load(LM_PREFIX))
        return cls(module.to(dtype), device)

    @classmethod
    def from_trtllm_checkpoint(cls, ckpt_dir, spec=None, device="cpu", dtype=torch.float32) -> "TorchDecoder":
        """Torch decoder on a TensorRT-LLM checkpoint (weights dequantized to what the engine multiplies)."""
        cfg, state = load_trtllm_checkpoint(ckpt_dir)
        text = text_spec(cfg)
        check_trtllm_text(text, spec, ckpt_dir)
        module = Qwen2Decoder(text).load_hf_state_dict(state)
        return cls(module.to(dtype), device, valid_vocab=spec.text.vocab_size if spec is not None else None)

    def steps(self, requests, generator=None, stats=None):
        """Greedy/sampled decoding of a batch of `DecoderRequest`s (same options for all), through
        `generation.decode_loop` (HF's processors; `stats`: a LoopStats timing the step calls).

        Each request brings its fake-id prompt and its own (rows, H) prompt table (rows may be 0).
        Yields (B,) int64 next ids per step on the device (finished rows keep being fed, the caller
        ignores them); the first yield follows the prefill. Runs in inference mode
        (`generation.in_inference_mode`).
        """
        return in_inference_mode(self._steps(requests, generator, stats))

    def _steps(self, requests, generator, stats):
        opts = requests[0].options
        sequences = [r.input_ids for r in requests]
        tables = [r.table for r in requests]
        ids, mask = left_pad(sequences, 0)
        ids = torch.as_tensor(ids, device=self.device)
        mask = torch.as_tensor(mask, device=self.device)
        b, n = ids.shape
        rows = [int(t.shape[0]) for t in tables]
        table = torch.cat([t.to(self.device, self.dtype) for t in tables]) if sum(rows) else None
        offsets = torch.as_tensor([sum(rows[:i]) for i in range(b)], device=self.device)
        total = n + opts.max_new_tokens
        cache = self.module.new_cache(b, total, self.dtype, self.device)
        key_mask = torch.zeros((b, total), dtype=torch.long, device=self.device)
        key_mask[:, :n] = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        x = self.module.embed(ids, table, offsets)
        logits = self.module(x, positions, cache, 0, attention_bias(key_mask[:, :n], n, 0, self.dtype))
        last = positions[:, -1:]

        def advance(nxt, step):
            nonlocal last
            key_mask[:, n + step] = 1
            last = last + 1
            x = self.module.embed(nxt[:, None], None, None)
            bias = attention_bias(key_mask[:, : n + step + 1], 1, n + step, self.dtype)
            return self.module(x, last, cache, n + step, bias)

        yield from decode_loop(logits, [r.prompt_ids for r in requests], opts, generator, advance,
                               valid_vocab=self.valid_vocab, stats=stats)
