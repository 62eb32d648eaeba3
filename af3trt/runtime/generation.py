"""The generation core every runtime and serving path uses: options with the reference's defaults,
logits processors with Hugging Face semantics, stop criteria, one incremental detokenizer, and the
token loops (torch logits -> ids on the device; ids -> text on the host).

Reference semantics (transformers `generate`, read in 5.x `generation/utils.py` and
`logits_process.py`): options come from the call, then the checkpoint's `generation_config.json`,
then GenerationConfig's global defaults (top_k 50, temperature 1.0, ...). Processors run in HF's
order: repetition penalty, (presence/frequency penalty: OpenAI's, HF has none), bad words,
min_new_tokens, then, only when sampling, temperature, top-k, top-p, min-p. The repetition
penalty's history is the prompt as HF sees it (`<sound>` at every audio row, left padding
excluded) plus the generated ids; each id is penalized once. Processors that only mask (padded
vocab, bad words, min_new_tokens) write -inf into the logits in place: the token loop owns them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import OptionError  # a generation option the caller gave that af3trt refuses (expected vs got)

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 256  # af3trt's one default where generation_config.json has no max_new_tokens
HF_DEFAULT_TOP_K = 50  # transformers GenerationConfig._get_default_generation_params()["top_k"]
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")
NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class GenerationOptions:
    """One request's generation options, validated once. Defaults are transformers' global ones
    (top_k 50 applies only when sampling); `GenerationDefaults.options` layers a checkpoint's
    generation_config.json and the caller's values on top. top_k 0 / top_p 1.0 / min_p 0.0 = off.
    presence/frequency penalties follow OpenAI: logit -= presence * [count > 0] + frequency * count,
    over the generated ids. bad_words: token-id sequences never generated (a multi-token one: its
    last id is banned after its prefix)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = HF_DEFAULT_TOP_K
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bad_words: tuple[tuple[int, ...], ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # eos ids do not end the answer (benchmarks fix output lengths this way)

    def __post_init__(self):
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def finite(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        checks = [
            ("max_new_tokens", integer(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("min_new_tokens", integer(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             f"an integer in [0, max_new_tokens={self.max_new_tokens}]"),
            ("do_sample", isinstance(self.do_sample, bool), "true or false"),
            ("temperature", finite(self.temperature) and self.temperature > 0, "a finite number > 0"),
            ("top_k", integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", finite(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1] (0 = off)"),
            ("repetition_penalty", finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "a finite number > 0 (1.0 = off)"),
            ("presence_penalty", finite(self.presence_penalty), "a finite number (0 = off)"),
            ("frequency_penalty", finite(self.frequency_penalty), "a finite number (0 = off)"),
            ("bad_words", all(isinstance(w, tuple) and w and all(integer(i) and i >= 0 for i in w)
                              for w in self.bad_words), "non-empty sequences of token ids"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("seed", self.seed is None or (integer(self.seed) and 0 <= self.seed < 2 ** 63), "an integer in [0, 2**63)"),
            ("eos_token_ids", all(integer(i) and i >= 0 for i in self.eos_token_ids), "token ids"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise OptionError(f"expected {name} {expected}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample


# generation_config.json keys af3trt applies, by option name
_CONFIG_KEYS = {"max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens", "do_sample": "do_sample",
                "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                "repetition_penalty": "repetition_penalty", "bad_words_ids": "bad_words"}
# keys that would change the answer and that af3trt does not implement, with their neutral values
_UNSUPPORTED = {"num_beams": 1, "no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "suppress_tokens": None,
                "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                "sequence_bias": None, "guidance_scale": None, "top_h": None, "num_return_sequences": 1,
                "exponential_decay_length_penalty": None, "renormalize_logits": False}


def _normalize(name: str, value):
    if name == "bad_words":
        return tuple(tuple(int(i) for i in w) for w in (value or ()))
    if name == "stop":
        return (value,) if isinstance(value, str) else tuple(value or ())
    if name == "eos_token_ids":
        return (int(value),) if isinstance(value, int) else tuple(int(i) for i in value)
    if name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty") \
            and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's generation defaults, read once from its generation_config.json (an engine dir
    carries a copy in tokenizer/). `options(**explicit)` resolves a request like HF `generate`:
    explicit values > the config > transformers' global defaults. Where the config has no
    max_new_tokens (HF would fall back to max_length=20 in total), af3trt uses
    DEFAULT_MAX_NEW_TOKENS and says so once."""

    values: tuple[tuple[str, object], ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    source: str = "transformers' defaults"

    @classmethod
    def from_dir(cls, path: str | Path, fallback_eos: int | None = None) -> "GenerationDefaults":
        file = Path(path) / GENERATION_CONFIG
        raw = json.loads(file.read_text()) if file.is_file() else {}
        if not isinstance(raw, dict):
            raise OptionError(f"expected a JSON object in {file}, got {type(raw).__name__}")
        return cls.from_config(raw, str(file) if file.is_file() else f"{path} (no {GENERATION_CONFIG})", fallback_eos)

    @classmethod
    def from_config(cls, raw: dict, source: str, fallback_eos: int | None = None) -> "GenerationDefaults":
        odd = {k: raw[k] for k, neutral in _UNSUPPORTED.items() if raw.get(k) not in (None, neutral, [], {})}
        if odd:
            logger.warning("%s sets %s, which af3trt does not implement; its answers will differ from "
                           "transformers' for this model", source, odd)
        values = {opt: _normalize(opt, raw[key]) for key, opt in _CONFIG_KEYS.items() if raw.get(key) is not None}
        eos = raw.get("eos_token_id")
        eos = _normalize("eos_token_ids", eos) if eos is not None else ((fallback_eos,) if fallback_eos is not None else ())
        pad = raw.get("pad_token_id")
        if "max_new_tokens" not in values:
            logger.info("%s has no max_new_tokens: af3trt's default of %d new tokens applies", source,
                        DEFAULT_MAX_NEW_TOKENS)
        out = cls(tuple(sorted(values.items())), eos, int(pad) if pad is not None else (eos[0] if eos else None), source)
        out.options()  # a config af3trt cannot run is refused when it is read, not at the first request
        return out

    def as_dict(self) -> dict:
        """The resolved defaults (what a request with no options gets)."""
        return {f.name: getattr(self.options(), f.name) for f in fields(GenerationOptions)}

    def options(self, **explicit) -> GenerationOptions:
        """Options for one request; `explicit` holds only what the caller set (None = not set).
        Sampling-only options set by the caller while sampling is off are refused, never dropped."""
        explicit = {k: _normalize(k, v) for k, v in explicit.items() if v is not None}
        known = {f.name for f in fields(GenerationOptions)}
        unknown = sorted(set(explicit) - known)
        if unknown:
            raise OptionError(f"expected generation options among {sorted(known)}, got unknown {unknown}")
        merged = {"eos_token_ids": self.eos_token_ids, **dict(self.values), **explicit}
        try:
            opts = GenerationOptions(**merged)
        except OptionError:
            raise
        except TypeError as exc:
            raise OptionError(f"invalid generation options {merged}: {exc}") from exc
        if not opts.do_sample:
            ignored = {k: explicit[k] for k in SAMPLING_ONLY if k in explicit and explicit[k] != NEUTRAL[k]}
            if ignored:
                why = "the call" if "do_sample" in explicit else self.source
                raise OptionError(f"expected do_sample=True with {ignored} (they only shape sampling), got "
                                  f"do_sample=False from {why}")
        return opts


# --------------------------------------------------------------------------- processors


class TokenState:
    """What the processors read, on the logits' device: `seen` (B, V) ids of the history (prompt as
    HF sees it + generated), `counts` (B, V) float32 of generated ids, `tail` (B, K) the last K ids
    (for multi-token bad words), `step` (generated so far). Updated by `append` without a host sync."""

    def __init__(self, prompts: Sequence[Sequence[int]], vocab: int, device, *, seen: bool = False,
                 counts: bool = False, tail: int = 0):
        b = len(prompts)
        self.step = 0
        self.seen = self.counts = self.tail = None
        if seen:
            mask = torch.zeros((b, vocab + 1), dtype=torch.bool)
            for i, ids in enumerate(prompts):
                if len(ids):
                    mask[i, torch.as_tensor(ids, dtype=torch.long).clamp(max=vocab)] = True
            self.seen = mask[:, :vocab].to(device)
        if counts:
            self.counts = torch.zeros((b, vocab), dtype=torch.float32, device=device)
        if tail:
            t = torch.full((b, tail), -1, dtype=torch.long)
            for i, ids in enumerate(prompts):
                last = list(ids)[-tail:]
                if last:
                    t[i, tail - len(last):] = torch.as_tensor(last, dtype=torch.long)
            self.tail = t.to(device)

    def append(self, ids: torch.Tensor) -> None:
        """ids (B,) int64 on the device: the step's chosen tokens."""
        self.step += 1
        if self.seen is None and self.counts is None and self.tail is None:
            return  # nothing tracked: no device work
        col = ids[:, None]  # < V: chosen from the (B, V) logits
        if self.seen is not None:
            self.seen.scatter_(1, col, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, col, torch.ones_like(col, dtype=torch.float32))
        if self.tail is not None:
            self.tail = torch.cat([self.tail[:, 1:], col], dim=1)


class RepetitionPenalty:
    """HF RepetitionPenaltyLogitsProcessor: each id of the history once; logit < 0 multiplied by the
    penalty, else divided."""

    needs = "seen"

    def __init__(self, penalty: float):
        self.penalty = float(penalty)

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        seen = state.seen[:, : logits.shape[-1]]
        penalized = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(seen, penalized, logits)


class PresenceFrequencyPenalty:
    """OpenAI's presence and frequency penalties over the generated ids (TensorRT-LLM has both)."""

    needs = "counts"

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = float(presence), float(frequency)

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        c = state.counts[:, : logits.shape[-1]]
        return logits - self.presence * (c > 0).to(logits.dtype) - self.frequency * c.to(logits.dtype)


class BadWords:
    """HF NoBadWordsLogitsProcessor: single ids are never generated; a longer sequence's last id is
    banned while the history ends with its prefix. Sequences equal to one eos id are dropped (HF)."""

    def __init__(self, sequences: Iterable[Sequence[int]], eos_token_ids: Sequence[int] = ()):
        eos = {(int(i),) for i in eos_token_ids}
        seqs = [tuple(s) for s in sequences if tuple(s) not in eos]
        self.single = _IdBan(s[0] for s in seqs if len(s) == 1)
        self.multi = [s for s in seqs if len(s) > 1]
        self.needs = "tail" if self.multi else None
        self.tail = max((len(s) - 1 for s in self.multi), default=0)
        self._multi: dict[torch.device, list[tuple[torch.Tensor, int]]] = {}

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        dev, v = logits.device, logits.shape[-1]
        if self.single.ids:
            logits = self.single(logits)
        if self.multi:
            ban = torch.zeros_like(logits, dtype=torch.bool)
            prefixes = self._multi.get(dev)
            if prefixes is None:
                prefixes = self._multi[dev] = [(torch.tensor(s[:-1], device=dev), s[-1]) for s in self.multi if s[-1] < v]
            for prefix, last in prefixes:
                match = (state.tail[:, state.tail.shape[1] - prefix.shape[0]:] == prefix).all(dim=1)
                ban[:, last] |= match
            logits = logits.masked_fill(ban, float("-inf"))
        return logits


class _IdBan:
    """Fixed ids (those < V) set to -inf in place: one index_fill_ per step, the ids' index tensor
    made once per (device, V) (a third of an out-of-place masked_fill's cost on CPU)."""

    def __init__(self, ids):
        self.ids = sorted(set(int(i) for i in ids))
        self._index: dict[tuple, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        key = (logits.device, logits.shape[-1])
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor([i for i in self.ids if i < key[1]], dtype=torch.long,
                                                    device=logits.device)
        return logits.index_fill_(-1, index, float("-inf"))


class MinNewTokens:
    """HF MinNewTokensLengthLogitsProcessor: no eos id before `min_new_tokens` generated ids."""

    def __init__(self, min_new_tokens: int, eos_token_ids: Sequence[int]):
        self.min_new = int(min_new_tokens)
        self.ban = _IdBan(eos_token_ids)

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        if state.step >= self.min_new or not self.ban.ids:
            return logits
        return self.ban(logits)


class SuppressPaddedVocab:
    """Rows of a padded lm_head past the model's vocabulary (e.g. ModelOpt pads to a multiple of
    64) are never generated."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        if logits.shape[-1] > self.vocab_size:
            logits[..., self.vocab_size:] = float("-inf")  # in place, as every masking processor here
        return logits


class Temperature:
    """HF TemperatureLogitsWarper."""

    def __init__(self, temperature: float):
        self.temperature = float(temperature)

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        return logits / self.temperature


class TopK:
    """HF TopKLogitsWarper (min_tokens_to_keep 1)."""

    def __init__(self, top_k: int):
        self.top_k = int(top_k)

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        k = min(self.top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        return logits.masked_fill(logits < kth, float("-inf"))


class TopP:
    """HF TopPLogitsWarper (min_tokens_to_keep 1)."""

    def __init__(self, top_p: float):
        self.top_p = float(top_p)

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - self.top_p)
        drop[..., -1:] = False
        return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


class MinP:
    """HF MinPLogitsWarper (min_tokens_to_keep 1): drop ids below min_p x the top probability."""

    def __init__(self, min_p: float):
        self.min_p = float(min_p)

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        drop = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        return logits.masked_fill(drop, float("-inf"))


def processors_for(opts: GenerationOptions, vocab_size: int | None = None) -> list:
    """The processor chain of `opts`, in HF's order; `vocab_size`: the model's vocabulary, when the
    logits may be wider (padded lm_head)."""
    chain: list = []
    if vocab_size is not None:
        chain.append(SuppressPaddedVocab(vocab_size))
    if opts.repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(opts.repetition_penalty))
    if opts.presence_penalty or opts.frequency_penalty:
        chain.append(PresenceFrequencyPenalty(opts.presence_penalty, opts.frequency_penalty))
    if opts.bad_words:
        chain.append(BadWords(opts.bad_words, opts.eos_token_ids))
    if opts.min_new_tokens:
        chain.append(MinNewTokens(opts.min_new_tokens, opts.eos_token_ids))
    if opts.do_sample:
        if opts.temperature != 1.0:
            chain.append(Temperature(opts.temperature))
        if opts.top_k:
            chain.append(TopK(opts.top_k))
        if opts.top_p < 1.0:
            chain.append(TopP(opts.top_p))
        if opts.min_p:
            chain.append(MinP(opts.min_p))
    return chain


def token_state(chain: list, prompts: Sequence[Sequence[int]], vocab: int, device) -> TokenState:
    """The TokenState `chain` needs (only what its processors read is tracked)."""
    needs = {getattr(p, "needs", None) for p in chain}
    tail = max((p.tail for p in chain if isinstance(p, BadWords)), default=0)
    return TokenState(prompts, vocab, device, seen="seen" in needs, counts="counts" in needs, tail=tail)


def select(logits: torch.Tensor, opts: GenerationOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) ids: argmax, or one multinomial draw of the softmax."""
    if not opts.do_sample:
        return greedy(logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) int64 argmax. For float32 logits on the CPU, numpy's argmax: the same rule
    (the first maximum; a NaN counts as the maximum, its first index wins) at a seventh of torch's
    per-call cost there (2 vs 14 us for 8 x 640), which is most of the token loop's host time."""
    if logits.is_cpu and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(-1))  # intp: int64 on every platform torch ships for
    return logits.argmax(-1)


def in_inference_mode(steps: Iterator) -> Iterator:
    """A decoder's step generator, run under torch.inference_mode. Where the caller is in inference
    mode when it creates the generator, it keeps it for every resume (`Pipeline._run` enters it once
    per generate), and the generator is returned as is; else each resume enters and leaves it, as
    torch's decorator does on a generator function (about 3 us per step on CPU)."""
    if torch.is_inference_mode_enabled():
        return steps
    return _each_resume_in_inference_mode(steps)


def _each_resume_in_inference_mode(steps: Iterator) -> Iterator:
    try:
        while True:
            with torch.inference_mode():
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        with torch.inference_mode():
            steps.close()


@dataclass
class LoopStats:
    """Seconds the token loop spent inside the decoder's step calls (`advance`), and their count."""

    model_seconds: float = 0.0
    steps: int = 0


def decode_loop(logits: torch.Tensor, prompts: Sequence[Sequence[int]], opts: GenerationOptions, generator, advance,
                valid_vocab: int | None = None, stats: LoopStats | None = None) -> Iterator[torch.Tensor]:
    """The token loop of every torch decoder. logits (B, V) float32 of the prefill's last position;
    prompts: each row's prompt ids as HF sees them (`<sound>` at audio rows, no padding);
    `advance(next_ids, step)` runs one decode step and returns the next (B, V) logits; valid_vocab:
    the model's vocabulary where the lm_head has more rows (ModelOpt's padding for INT4 AWQ,
    `af3trt.formats.precision.engine_vocab_size`): ids >= it are never generated. Yields (B,) int64
    ids on the logits' device, never reading them on the host."""
    import time

    chain = processors_for(opts, valid_vocab)
    state = token_state(chain, prompts, logits.shape[-1], logits.device)
    for step in range(opts.max_new_tokens):
        for proc in chain:
            logits = proc(logits, state)
        nxt = select(logits, opts, generator)
        state.append(nxt)
        yield nxt
        if step + 1 == opts.max_new_tokens:
            return
        t0 = time.perf_counter()
        logits = advance(nxt, step)
        if stats is not None:
            stats.model_seconds += time.perf_counter() - t0
            stats.steps += 1


# --------------------------------------------------------------------------- detokenizer, stops


class IncrementalDetokenizer:
    """Token ids -> text, O(new tokens) per call: decodes a short window (the ids since the last
    emitted piece, with the ids of the piece before them as context) instead of the whole answer.
    A piece that ends in an incomplete UTF-8 sequence (U+FFFD from byte-level BPE) waits for its
    next token. `text` (all pieces + `flush()`) equals `tokenizer.decode(ids, skip_special_tokens)`."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self._fast = _backend_decode(tokenizer)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: context ids whose text is already emitted
        self._read = 0  # ids before this are in `text`
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def _decode(self, ids) -> str:
        if self._fast is not None:
            return self._fast(ids, skip_special_tokens=self.skip)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, ids: Sequence[int]) -> str:
        """Append ids; return the new text they complete ("" while a character is incomplete)."""
        self.ids.extend(ids)
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(self._prefix_text) and not window.endswith("\ufffd"):
            return self._emit(window)
        return ""

    def flush(self) -> str:
        """The rest at the end of generation (an incomplete trailing character decodes as U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        window = self._decode(self.ids[self._prefix :])
        return self._emit(window) if len(window) > len(self._prefix_text) else ""

    def _emit(self, window: str) -> str:
        piece = window[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        self.text += piece
        return piece


def _backend_decode(tokenizer):
    """The Rust `tokenizers` decode behind a fast HF tokenizer, when it is what `tokenizer.decode`
    returns (transformers' fast decode is the backend's, then an optional space clean-up that
    Qwen's tokenizer config turns off): the same text without transformers' per-call Python cost."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode") or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend.decode


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may begin a stop string (not shown to a stream yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class AnswerStream:
    """One answer, token by token: eos ids, stop strings (spanning token boundaries, several at
    once) and max_new_tokens decide its end. `text` is the answer (special tokens skipped; a stop
    string and what follows it removed); `pending()` the piece a stream may show now (held back
    while it could be the start of a stop string). `tokens` keep the id that ended the answer (eos
    or the one completing a stop string), as HF's output does. finish_reason: "stop" (eos id),
    "stop_string", "length". Without stop strings or streaming, text is decoded once, at the end."""

    def __init__(self, tokenizer, opts: GenerationOptions, streaming: bool = False):
        self.tokenizer = tokenizer
        self.opts = opts
        self.eos = frozenset() if opts.ignore_eos else frozenset(opts.eos_token_ids)
        self.stops = opts.stop
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.live = streaming or bool(self.stops)
        self.detok = IncrementalDetokenizer(tokenizer) if self.live else None
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._checked = 0  # text before this index holds no stop string
        self._cut: int | None = None
        self._sent = 0
        self._final: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, tokens: Iterable[int]) -> None:
        """Take generated ids (those after the end are ignored)."""
        for tok in tokens:
            if self.done:
                return
            tok = int(tok)
            self.tokens.append(tok)
            if self.live:
                self.detok.add((tok,))
                if self.stops and self._find_stop():
                    self._finish("stop_string")
                    return
            if tok in self.eos:
                self._finish("stop")
            elif len(self.tokens) >= self.opts.max_new_tokens:
                self._finish("length")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.live and self.detok.flush() and self.stops and self._find_stop():
            self.finish_reason = "stop_string"

    def _find_stop(self) -> bool:
        if self._cut is None:
            text = self.detok.text
            start = max(0, self._checked - self.longest_stop + 1)
            hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
            self._checked = len(text)
            if hits:
                self._cut = min(hits)
        return self._cut is not None

    @property
    def text(self) -> str:
        if self.live:
            text = self.detok.text
            return text[: self._cut] if self._cut is not None else text
        if self._final is None or not self.done:
            self._final = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._final

    def pending(self) -> str:
        """The text a stream may show now that it has not shown yet."""
        text = self.text
        end = len(text) if self.done else len(text) - _held_back(text, self.stops)
        if end <= self._sent:
            return ""
        piece, self._sent = text[self._sent:end], end
        return piece


def read_steps(steps: Iterator[torch.Tensor], answers: list[AnswerStream], every_step: bool = False):
    """Drive a decoder's `steps` (one (B,) id tensor per step) until every answer is over.
    On CUDA the ids stay on the device: each step's are copied to a pinned host buffer without
    blocking and read one step later (while the device computes the next), at once for the first
    step and for every step when `every_step` (a stream shows them as they come). On the CPU they
    are read at once (nothing to overlap; a late read would cost one more forward).
    The host rows wait in a backlog and reach the answers only when one of them can end: an eos id
    among them, an answer's max_new_tokens, or an answer that needs every token (a stream, stop
    strings). Otherwise a step costs one set test, not a call per answer.
    Yields after each step's read; closes `steps` when done (a backend then cancels)."""
    live = every_step or any(a.live for a in answers)
    eos = frozenset().union(*(a.eos for a in answers))
    until = min(a.opts.max_new_tokens for a in answers)  # rows read when the first answer reaches its length
    backlog: list[list[int]] = []
    read = 0  # rows fed to the answers
    pending: list[tuple[torch.Tensor, object]] = []
    host = None  # CUDA: one pinned (steps, B) buffer the ids are copied into without blocking

    def take(row: list[int]) -> bool:
        """One host row of ids; True when every answer is over."""
        backlog.append(row)
        if not live and eos.isdisjoint(row) and read + len(backlog) < until:
            return False
        return flush()

    def flush() -> bool:
        nonlocal read
        for i, answer in enumerate(answers):
            answer.feed([r[i] for r in backlog])
        read += len(backlog)
        backlog.clear()
        return all(a.done for a in answers)

    def drain(keep: int) -> bool:
        while len(pending) > keep:
            ids, event = pending.pop(0)
            event.synchronize()
            if take(ids.tolist()):
                return True
        return False

    try:
        for step, nxt in enumerate(steps):
            if not nxt.is_cuda:
                over = take(nxt.tolist())
            else:
                if host is None or step >= host.shape[0]:
                    rows = max(max(a.opts.max_new_tokens for a in answers), step + 1)
                    host = torch.empty((rows, nxt.shape[0]), dtype=nxt.dtype, pin_memory=True)
                host[step].copy_(nxt, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                pending.append((host[step], event))
                over = drain(0 if every_step or step == 0 else 1)  # the first token at once: time to first token
            yield
            if over:
                return
        drain(0)
        flush()  # the steps ended before every answer did (a backend that stops by itself)
        yield
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()

