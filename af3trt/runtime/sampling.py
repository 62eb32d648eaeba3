"""Generation options and next-token selection (greedy, or sampling with HF's processor order)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenerationOptions:
    """Validated once; `min_new_tokens` forbids the stop ids before it (benchmarks fix the length)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self):
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens >= 1", self.max_new_tokens),
            (isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             "0 <= min_new_tokens <= max_new_tokens", self.min_new_tokens),
            (self.temperature > 0, "temperature > 0", self.temperature),
            (0 < self.top_p <= 1, "0 < top_p <= 1", self.top_p),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k >= 0", self.top_k),
            (self.repetition_penalty > 0, "repetition_penalty > 0", self.repetition_penalty),
            (all(isinstance(s, str) and s for s in self.stop), "stop as non-empty strings", self.stop),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ValueError(f"expected {expected}, got {got!r}")


def select_next(logits: torch.Tensor, history: torch.Tensor, opts: GenerationOptions, generator) -> torch.Tensor:
    """logits (B, V) float32, history (B, L) ids seen so far -> (B,) next ids."""
    if opts.repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen < 0, seen * opts.repetition_penalty, seen / opts.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if not opts.do_sample:
        return logits.argmax(-1)
    logits = logits / opts.temperature
    if opts.top_k:
        kth = torch.topk(logits, min(opts.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - opts.top_p)
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_loop(logits: torch.Tensor, history: torch.Tensor, opts: GenerationOptions, generator, advance,
                valid_vocab: int | None = None):
    """The token loop every torch decoder shares: from the prefill's last logits (B, V), yield (B,)
    next ids; `advance(next_ids, step)` runs one decode step and returns the next logits.

    valid_vocab: the model's vocab when the lm_head has more rows (ModelOpt's zero padding for
    INT4 AWQ, `af3trt.build.precision.engine_vocab_size`): ids >= it are never generated."""
    eos = torch.as_tensor(list(opts.eos_token_ids), device=logits.device, dtype=torch.long)
    for step in range(opts.max_new_tokens):
        if valid_vocab is not None and valid_vocab < logits.shape[-1]:
            logits[:, valid_vocab:] = float("-inf")
        if step < opts.min_new_tokens and eos.numel():
            logits[:, eos] = float("-inf")
        nxt = select_next(logits, history, opts, generator)
        yield nxt
        if step + 1 == opts.max_new_tokens:
            return
        history = torch.cat([history, nxt[:, None]], dim=1)
        logits = advance(nxt, step)
