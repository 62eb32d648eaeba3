"""Fast torch Qwen2 decoder without TensorRT: static KV cache, CUDA-graph decode, Triton GEMV linears.

Same backend contract as `decoder.TorchDecoder` (`steps(requests, generator)` yields (B,) next ids;
prompt-table fake ids, DESIGN §4). What makes it fast on a GPU (shared/reference/af3.md: an eager
step is 13.1 ms, a CUDA graph of it 6.08 ms, the bf16 weight-read floor 3.31 ms on an H200):

- the KV cache is preallocated for (max_batch, max_seq) per layer, so a decode step has fixed
  shapes and fixed addresses and is captured once per (batch, attended KV length) into a CUDA
  graph; the graphs share one memory pool. The step reads its varying inputs (token ids, the
  cache slot it writes, each row's first valid slot) from static device buffers: no host sync,
  no data-dependent Python branch, so replay == eager (`_decode_step` runs eagerly on CPU);
- decode linears go through `kernels.gemv` (split-K Triton GEMV; batch <= 8), with q/k/v fused
  into one weight and gate/up into another: 3 launches fewer per layer and larger matrices;
- FP8 checkpoints keep their float8_e4m3fn weights (`fp8_weights`): weight-only FP8 GEMV at
  decode, `torch._scaled_mm` (per-call activation scale) at prefill;
- prefill is one batched pass over the left-padded prompts (SDPA; causal flash without padding),
  or one unpadded pass per row when the padding mask of a batched pass would be large.

Off CUDA the same code runs eagerly with `F.linear` and the kernels' torch references, in any
dtype, so CPU tests can compare tokens with `TorchDecoder`. One generation at a time per object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels.gemv import MAX_M, gemv_bf16, gemv_fp8
from ..prompt import left_pad
from ..spec import ModelSpec
from .decoder import TorchDecoder, attention_bias, check_trtllm_text, check_valid_vocab, rotate_half
from .fast_weights import FastLayer, FastLinear, FastWeights, fast_weights, fp8_linear
from .fp8_weights import load_fp8_trtllm_checkpoint
from .generation import decode_loop, in_inference_mode

__all__ = ["FastTorchDecoder", "KV_BUCKET"]

# Attended KV lengths of the captured decode steps: 256, 512, 1024, ... up to the cache length.
# Attention reads at most 2x the live keys (masked) in exchange for ~log2(max_seq / 256) graphs
# per batch size; at 1024 keys and batch 8 the attended cache is 0.47 GB against 15 GB of weights.
KV_BUCKET = 256
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# --------------------------------------------------------------------------- decoder


@dataclass
class _Session:
    batch: int
    prompt_len: int  # padded prompt length n: decode step s writes cache slot n + s
    step: int = 0


class _DecodeGraphs:
    """CUDA graphs of `step(batch, kv_len)`, captured lazily, one per (batch, kv_len), one pool."""

    def __init__(self, step):
        self.step = step
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, batch: int, kv_len: int) -> torch.Tensor:
        entry = self.graphs.get((batch, kv_len))
        if entry is None:
            entry = self.graphs[(batch, kv_len)] = self._capture(batch, kv_len)
        entry[0].replay()
        return entry[1]

    def _capture(self, batch: int, kv_len: int):
        # Warm-up on a side stream first (Triton JIT + module load, cuBLAS workspaces, SDPA kernel
        # choice must not happen inside the capture). It runs on the live static inputs and writes
        # the same KV slot the replay then rewrites with the same values, so it is harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(batch, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(batch, kv_len)
        return graph, out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class FastTorchDecoder:
    """Decoder backend: static KV cache, one-pass prefill, CUDA-graph decode steps, GEMV linears.

    weights: `FastWeights`; max_batch / max_seq: initial cache size (grown, and graphs dropped,
    when a request needs more); use_graphs: capture decode steps (default: on CUDA); kernels: the
    Triton GEMVs for <= 8 rows (default: on CUDA in bfloat16; off CUDA they are their references);
    fp8_activations: FP8 linears over > 8 rows (prefill) quantize activations for `torch._scaled_mm`
    (default: where supported) or, False, multiply dequantized weights (weight-only, more accurate).
    """

    name = "torch-fast"
    # Above this, a padded batch prefills row by row: the additive mask of a batched pass grows as
    # B x T^2 (8 rows of 10 min audio, T = 15k: 3.6 GB in bf16), while rows that long fill the GPU
    # alone; below it one batched pass reads the weights once for all rows.
    prefill_mask_bytes = 256 << 20

    def __init__(self, weights: FastWeights, device=None, *, max_batch: int = 8, max_seq: int = 4096,
                 use_graphs: bool | None = None, kernels: bool | None = None, fp8_activations: bool | None = None,
                 valid_vocab: int | None = None):
        self.w = weights
        self.spec = weights.text
        self.vocab_size = weights.text.vocab_size  # embedding rows: fake ids start here
        self.valid_vocab = check_valid_vocab(valid_vocab, self.vocab_size)
        self.dtype = weights.dtype
        self.device = torch.device(device) if device is not None else weights.embed.device
        if self.device != weights.embed.device and not (self.device.type == "cuda" == weights.embed.device.type):
            raise ValueError(f"expected weights on {self.device}, got {weights.embed.device}")
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else use_graphs
        self.kernels = (on_cuda and self.dtype == torch.bfloat16) if kernels is None else kernels
        self.fp8_activations = fp8_activations
        if self.use_graphs and not on_cuda:
            raise ValueError(f"expected a CUDA device for CUDA graphs, got {self.device}")
        if self.kernels and self.dtype != torch.bfloat16:
            raise ValueError(f"expected dtype torch.bfloat16 for the GEMV kernels, got {self.dtype}")
        t = self.spec
        self.group = t.num_heads // t.num_kv_heads
        self.qkv_sizes = [t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.num_kv_heads * t.head_dim]
        self.max_batch, self.max_seq = max_batch, _round_up(max_seq, KV_BUCKET)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._session: _Session | None = None
        self._runner = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module, device=None, **kw) -> "FastTorchDecoder":
        """From a `decoder.Qwen2Decoder` (its dtype; weights fused, the module is not kept)."""
        dtype = next(module.parameters()).dtype
        state = {k: v.detach() for k, v in module.state_dict().items()}
        device = device or next(module.parameters()).device
        return cls(fast_weights(module.t, state, None, device, dtype), device, **kw)

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu", dtype=torch.float32, **kw) -> "FastTorchDecoder":
        module = TorchDecoder.from_checkpoint(ckpt, "cpu", dtype).module
        return cls(fast_weights(module.t, module.state_dict(), None, device, dtype), device, **kw)

    @classmethod
    def from_trtllm_checkpoint(cls, ckpt_dir, spec: ModelSpec | None = None, device="cpu", dtype=torch.float32,
                               fp8: bool | None = None, **kw) -> "FastTorchDecoder":
        """On a TensorRT-LLM checkpoint. fp8=None: FP8 weights kept when the checkpoint is FP8;
        fp8=False: every weight dequantized (as `TorchDecoder`); fp8=True: an FP8 checkpoint required."""
        cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
        is_fp8 = (cfg.get("quantization") or {}).get("quant_algo") == "FP8"
        if fp8 is None:
            fp8 = is_fp8
        if spec is not None:
            kw.setdefault("valid_vocab", spec.text.vocab_size)
        if not fp8:
            module = TorchDecoder.from_trtllm_checkpoint(ckpt_dir, spec, "cpu", dtype).module
            return cls(fast_weights(module.t, module.state_dict(), None, device, dtype), device, **kw)
        ck = load_fp8_trtllm_checkpoint(ckpt_dir)
        check_trtllm_text(ck.text, spec, ckpt_dir)
        return cls(fast_weights(ck.text, ck.weights, ck.scales, device, dtype), device, **kw)

    # -- building blocks ------------------------------------------------------------------------
    def _linear(self, lin: FastLinear, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N). GEMV for <= 8 rows (memory-bound); cuBLAS / _scaled_mm above."""
        gemv = self.kernels and x.shape[0] <= MAX_M
        if lin.scale is None:
            return gemv_bf16(x, lin.weight, lin.bias) if gemv else F.linear(x, lin.weight, lin.bias)
        if gemv:
            return gemv_fp8(x, lin.weight, lin.scale, lin.bias)
        return fp8_linear(x, lin.weight, lin.scale, lin.bias, scaled_mm=self.fp8_activations)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, head_dim) in the model dtype (HF's rotate_half layout)."""
        freqs = positions[..., None].float() * self.w.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    def _block(self, layer: FastLayer, x, cos, sin, attend) -> torch.Tensor:
        """One decoder layer on x (B, T, H); attend(q, k, v) -> (B, T, heads*head_dim) writes the cache."""
        b, n, _ = x.shape
        t = self.spec
        h = layer.input_norm(x).reshape(b * n, -1)
        q, k, v = self._linear(layer.qkv, h).split(self.qkv_sizes, dim=-1)
        q = q.reshape(b, n, t.num_heads, t.head_dim).transpose(1, 2)
        k = k.reshape(b, n, t.num_kv_heads, t.head_dim).transpose(1, 2)
        v = v.reshape(b, n, t.num_kv_heads, t.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = attend(q, k, v)
        x = x + self._linear(layer.o, o.reshape(b * n, -1)).view(b, n, -1)
        h = layer.post_norm(x).reshape(b * n, -1)
        gate, up = self._linear(layer.gate_up, h).chunk(2, dim=-1)
        return x + self._linear(layer.down, F.silu(gate) * up).view(b, n, -1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H) last hidden states -> (B, V) float32 logits."""
        return self._linear(self.w.lm_head, self.w.norm(x)).float()

    def _embed(self, ids, table, offsets) -> torch.Tensor:
        """Prompt-table lookup of Qwen2Decoder.embed: id >= vocab reads row id - vocab + offset."""
        vocab = self.spec.vocab_size
        fake = ids >= vocab
        x = F.embedding(ids.masked_fill(fake, 0), self.w.embed)
        if bool(fake.any()):
            if table is None:
                raise ValueError(f"ids >= vocab_size {vocab} need a prompt table, got none")
            rows = ids - vocab + offsets[:, None]
            x[fake] = table[rows[fake]].to(x.dtype)
        return x

    # -- cache ----------------------------------------------------------------------------------
    def _ensure_cache(self, batch: int, length: int) -> None:
        """Allocate (or grow) the static cache and its static step inputs; growing drops the graphs."""
        if self.cache is not None and self.cache[0][0].shape[0] >= batch and self.cache[0][0].shape[2] >= length:
            return
        t, dev = self.spec, self.device
        self.max_batch, self.max_seq = max(self.max_batch, batch), max(self.max_seq, _round_up(length, KV_BUCKET))
        self.cache = self._runner = None  # free the old cache before allocating the new one
        shape = (self.max_batch, t.num_kv_heads, self.max_seq, t.head_dim)
        # zeros, not empty: masked keys get probability 0, and 0 * NaN garbage would still be NaN
        self.cache = [(torch.zeros(shape, dtype=self.dtype, device=dev), torch.zeros(shape, dtype=self.dtype, device=dev))
                      for _ in range(t.num_layers)]
        self._tokens = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self._start = torch.zeros(self.max_batch, dtype=torch.long, device=dev)  # first valid slot per row
        self._write = torch.zeros(1, dtype=torch.long, device=dev)  # slot this step writes (all rows)
        self._slots = torch.arange(self.max_seq, device=dev)
        self._runner = _DecodeGraphs(self._decode_step) if self.use_graphs else self._decode_step

    def kv_bucket(self, kv_len: int) -> int:
        """Attended KV length (a captured shape) for `kv_len` live slots."""
        b = KV_BUCKET
        while b < kv_len:
            b *= 2
        return min(b, self.max_seq)

    # -- prefill / decode -----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, requests) -> torch.Tensor:
        """Left-padded prompts of `DecoderRequest`s -> (B, V) float32 next-token logits.

        One batched pass with a padding mask, or, when that (B, 1, T, T) mask would exceed
        `prefill_mask_bytes`, one unpadded causal pass per row written at its padded slots.
        Starts a session: the cache holds the prompts, `decode` continues from here."""
        opts = requests[0].options
        ids, mask = left_pad([r.input_ids for r in requests], 0)
        ids = torch.as_tensor(ids, device=self.device)
        mask = torch.as_tensor(mask, device=self.device)
        b, n = ids.shape
        self._ensure_cache(b, n + opts.max_new_tokens)
        rows = [int(r.table.shape[0]) for r in requests]
        table = torch.cat([r.table.to(self.device, self.dtype) for r in requests]) if sum(rows) else None
        offsets = torch.as_tensor([sum(rows[:i]) for i in range(b)], device=self.device)
        x = self._embed(ids, table, offsets)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        pads = [n - len(r.input_ids) for r in requests]
        if any(pads) and b * n * n * x.element_size() > self.prefill_mask_bytes:
            last = torch.cat([self._prefill_pass(x[i : i + 1, p:], positions[i : i + 1, p:], None, i, p)
                              for i, p in enumerate(pads)])
        else:
            last = self._prefill_pass(x, positions, attention_bias(mask, n, 0, self.dtype), 0, 0)
        self._start[:b].copy_(torch.as_tensor(pads, device=self.device))
        self._session = _Session(b, n)
        return self._logits(last)

    def _prefill_pass(self, x, positions, bias, row: int, slot: int) -> torch.Tensor:
        """x (b, T, H) -> last hidden states (b, H); K/V go to cache rows row.., slots slot.."""
        cos, sin = self._rope(positions)
        for i, layer in enumerate(self.w.layers):
            x = self._block(layer, x, cos, sin, partial(self._attend_prefill, i, bias, row, slot))
        return x[:, -1]

    def _attend_prefill(self, i, bias, row, slot, q, k, v) -> torch.Tensor:
        b, _, n, _ = q.shape
        ck, cv = self.cache[i]
        ck[row : row + b, :, slot : slot + n] = k
        cv[row : row + b, :, slot : slot + n] = v
        if bias is None:  # no padding: causal flash attention, which takes GQA as is
            o = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=self.group > 1)
        else:
            # Padding mask: the memory-efficient kernel takes a mask but not GQA (SDPA would fall
            # back to the math path and materialize B x heads x T x T scores), so repeat K/V.
            k, v = k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return o.transpose(1, 2).reshape(b, n, -1)

    def _decode_step(self, batch: int, kv_len: int) -> torch.Tensor:
        """The captured function: one token per row from the static buffers -> (batch, V) logits.

        Fixed shapes for a given (batch, kv_len); reads `_tokens`, `_write`, `_start` on the device;
        no host sync. Attends slots [0, kv_len) with slots outside [start_b, write] masked."""
        start = self._start[:batch]
        x = F.embedding(self._tokens[:batch], self.w.embed)[:, None]
        cos, sin = self._rope((self._write - start)[:, None])
        slots = self._slots[:kv_len]
        live = (slots[None] >= start[:, None]) & (slots[None] <= self._write)
        mask = torch.where(live, 0.0, float("-inf")).to(self.dtype)[:, None, None]  # (B, 1, 1, kv_len)
        # Not cuDNN attention: its CUDA-graph capture with masks has known failures (e.g.
        # pytorch/pytorch#140930, TransformerEngine#2344); flash takes no mask, so on CUDA this is
        # the memory-efficient kernel, on CPU flash-CPU or math.
        with sdpa_kernel(DECODE_ATTENTION):
            for i, layer in enumerate(self.w.layers):
                x = self._block(layer, x, cos, sin, partial(self._attend_decode, i, kv_len, mask))
        return self._logits(x[:, -1])

    def _attend_decode(self, i, kv_len, mask, q, k, v) -> torch.Tensor:
        b, t = q.shape[0], self.spec
        ck, cv = self.cache[i][0][:b], self.cache[i][1][:b]
        ck.index_copy_(2, self._write, k)
        cv.index_copy_(2, self._write, v)
        # The `group` query heads of one KV head become `group` query positions of that head: plain
        # attention over (B, kv_heads) with a broadcast mask, no K/V repeat and no GQA kernel needed.
        q = q.reshape(b, t.num_kv_heads, self.group, t.head_dim)
        o = F.scaled_dot_product_attention(q, ck[:, :, :kv_len], cv[:, :, :kv_len], attn_mask=mask)
        return o.reshape(b, 1, -1)

    @torch.inference_mode()
    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed (B,) ids of the session's next position -> (B, V) float32 logits.

        With CUDA graphs the result is the graph's output buffer: valid until the next `decode`."""
        s = self._session
        if s is None:
            raise RuntimeError("expected prefill(requests) before decode, got no session")
        slot = s.prompt_len + s.step
        if slot >= self.max_seq:
            raise ValueError(f"expected at most {self.max_seq} cached positions, got {slot + 1}")
        if tuple(next_ids.shape) != (s.batch,):
            raise ValueError(f"expected ({s.batch},) next ids, got {tuple(next_ids.shape)}")
        self._tokens[: s.batch].copy_(next_ids)
        self._write.fill_(slot)
        s.step += 1
        return self._runner(s.batch, self.kv_bucket(slot + 1))

    def steps(self, requests, generator=None, stats=None):
        """Greedy/sampled decoding of a batch of `DecoderRequest`s, as `TorchDecoder.steps`:
        yields (B,) int64 next ids per step on the device, the first after the prefill."""
        return in_inference_mode(self._steps(requests, generator, stats))

    def _steps(self, requests, generator, stats):
        logits = self.prefill(requests)
        yield from decode_loop(logits, [r.prompt_ids for r in requests], requests[0].options, generator,
                               lambda nxt, step: self.decode(nxt), valid_vocab=self.valid_vocab, stats=stats)
