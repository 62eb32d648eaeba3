"""Pipeline: conversations -> features -> encoder -> prompt table -> decoder -> text."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import __version__
from ..audio import audio_warnings
from ..dtypes import DTYPES
from ..errors import OptionError
from ..features import log_mel, padded_windows
from ..formats.limits import Limits
from ..formats.manifest import MANIFEST, Manifest, ManifestError
from ..formats.trtllm_engine import engine_config, kv_reuse_allowed
from ..kernels.logmel import log_mel_windows
from ..records import RecordMapping
from ..prompt import DEFAULT_TRANSCRIBE_PROMPT, Prompt, PromptBuilder, PromptError, strip_transcription_prefix
from ..spec import ModelSpec
from ..think import THINK_SUFFIX, check_variant, open_checkpoint
from ..tiny import default_tiny_dir, make_tiny_checkpoint
from .cache import DEFAULT_BUDGET_BYTES, EmbeddingCache
from .decoder import TorchDecoder
from ..formats.encoder_io import ONNX_FILE, PLAN_FILE, encoder_dir
from .encoder import available_encoders, load_encoder, valid_rows
from .fast_decoder import FastTorchDecoder
from .generation import AnswerStream, GenerationDefaults, GenerationOptions, LoopStats, read_steps
from .stitch import audio_hash, make_request
from .trtllm import TensorRTLLMDecoder, check_engine, check_single_rank

@dataclass(frozen=True)
class Timings(RecordMapping):
    """One generate call's stage times in seconds (every conversation of the call shares them):
    features, encoder, prefill (to the first token), decode (the rest), total, ttft;
    tokens_per_second over the decode phase; decode_host_per_step (torch decoders only, else None)
    the token loop's time outside the decoder's step calls. A read-only mapping of the fields that
    are set, so `timings["decode"]` and `dict(timings)` (JSON) read it."""

    features: float = 0.0
    encoder: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    total: float = 0.0
    ttft: float = 0.0
    tokens_per_second: float = 0.0
    decode_host_per_step: float | None = None

    def _items(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Result:
    """One conversation's answer. finish_reason: "stop" (an eos id), "stop_string", "length";
    prompt_tokens: the prompt's length, audio rows included. timings: the call's `Timings`.
    warnings: what was done to the conversation's audios, "AUDIO[i]: ..." (i in prompt order; e.g.
    audio past 10 minutes truncated, a file that decoded short), as `af3trt.audio.audio_warnings`
    words them for every entry point (CLI --json, the Triton models' WARNINGS, the OpenAI API)."""

    text: str
    token_ids: list[int]
    num_audio_tokens: int
    finish_reason: str
    timings: Timings = field(default_factory=Timings)
    prompt_tokens: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "num_audio_tokens": self.num_audio_tokens,
                "prompt_tokens": self.prompt_tokens, "finish_reason": self.finish_reason, "timings": dict(self.timings),
                "warnings": self.warnings}


def _is_single_conversation(conversations) -> bool:
    return bool(conversations) and isinstance(conversations[0], dict) and "role" in conversations[0]


def _pick(requested: str, available: tuple[str, ...], kind: str, missing: dict[str, str] | None = None) -> str:
    """`requested` if available ("auto": the first); a known backend missing here says why (`missing`)."""
    if requested == "auto":
        return available[0]
    if requested in (missing or {}):
        raise OptionError(f"{kind} backend {requested!r} is not available here: {missing[requested]}; "
                          f"available: {('auto',) + available}")
    if requested not in available:
        raise OptionError(f"expected {kind} backend in {('auto',) + available}, got {requested!r}")
    return requested


def _no_cuda_reason() -> str | None:
    if torch.cuda.is_available():
        return None
    return (f"this torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
            else "no CUDA device is visible")


def _check_device(device) -> None:
    if str(device).startswith("cuda") and (reason := _no_cuda_reason()):
        raise OptionError(f"expected a usable CUDA device for device {str(device)!r}, got none: {reason} "
                          f"(use device 'cpu')")


def unavailable_decoders(manifest) -> dict[str, str]:
    """{decoder backend: why it cannot run here} for an engine dir's manifest (None: a checkpoint dir)."""
    reasons = []
    if manifest is None:
        reasons.append("an AF3 checkpoint dir has no TensorRT-LLM engine (build one with `af3trt build`)")
    elif not manifest.stage("llm_engine"):
        reasons.append("the engine dir has no llm/engine (finish `af3trt build` on a machine with TensorRT-LLM)")
    if not importlib.util.find_spec("tensorrt_llm"):
        reasons.append("TensorRT-LLM is not installed (pip install tensorrt_llm==1.2.* --extra-index-url "
                       "https://pypi.nvidia.com, or an NGC TensorRT-LLM container)")
    if (cuda := _no_cuda_reason()) is not None:
        reasons.append(cuda)
    return {"tensorrt_llm": "; ".join(reasons)} if reasons else {}


def unavailable_encoders(path) -> dict[str, str]:
    """{encoder backend: why it cannot run here} for an engine dir (None: a checkpoint dir)."""
    d = encoder_dir(path) if path is not None else None
    trt, ort = [], []
    if d is None or not (d / PLAN_FILE).is_file():
        trt.append("no encoder/encoder.plan (finish `af3trt build` on a machine with TensorRT)")
    if not importlib.util.find_spec("tensorrt"):
        trt.append("TensorRT is not installed (pip install tensorrt)")
    if (cuda := _no_cuda_reason()) is not None:
        trt.append(cuda)
    if d is None or not (d / ONNX_FILE).is_file():
        ort.append("no encoder/encoder.onnx")
    if not importlib.util.find_spec("onnxruntime"):
        ort.append("ONNX Runtime is not installed (pip install onnxruntime)")
    return {k: "; ".join(v) for k, v in (("tensorrt", trt), ("onnxruntime", ort)) if v}


class Pipeline:
    """AF3 inference. Build with `Pipeline.from_pretrained(path)`. Thread-safe: the front end and
    encoder serve one call at a time; a decoder with `concurrent = True` (TensorRT-LLM) receives the
    requests of all threads at once (in-flight batching), the torch decoders one batch at a time."""

    def __init__(self, builder: PromptBuilder, encoder, decoder, spec: ModelSpec, defaults: GenerationDefaults, device,
                 limits: Limits | dict | None = None, cache_bytes: int = DEFAULT_BUDGET_BYTES,
                 fake_id_base: int | None = None):
        self.builder = builder
        # where fake ids start: the decoder's embedding rows (ModelOpt pads them for int4_awq), else the model's vocab
        self.fake_id_base = int(fake_id_base if fake_id_base is not None else spec.text.vocab_size)
        self.limits = Limits.read(limits)  # None fields: not checked
        self.cache = EmbeddingCache(cache_bytes)
        self.encoder_calls = 0
        self.encoder = encoder
        self.decoder = decoder
        self.spec = spec
        self.defaults = defaults  # the model's generation_config.json: what a request without options gets
        self.eos_token_ids = defaults.eos_token_ids
        self.device = torch.device(device)
        self.tokenizer = builder.tokenizer
        self._lock = threading.Lock()  # prompt building, encoder, cache
        # a decoder that batches requests itself (TensorRT-LLM's executor: in-flight batching) takes
        # them from every thread at once; the torch decoders run one batch at a time
        self._decode_lock = contextlib.nullcontext() if getattr(decoder, "concurrent", False) else threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, encoder: str = "auto", decoder: str = "auto",
                        device: str | None = None, dtype: str | torch.dtype | None = None,
                        allow_urls: bool = False, cache_bytes: int = DEFAULT_BUDGET_BYTES,
                        variant: str | None = None, think_suffix: bool = True) -> "Pipeline":
        """path: an engine dir (manifest.json, from `af3trt build`), an AF3 checkpoint dir (HF layout),
        or "tiny" (generated into the cache on first use). encoder: auto|tensorrt|onnxruntime|torch;
        decoder: auto|tensorrt_llm|torch ("auto" = the best available in the dir). variant: "base" |
        "think" (AF3-Think: the checkpoint's think/ LoRA + non-LoRA weights, `af3trt.think`); None =
        "base" for a checkpoint dir, whatever an engine dir was built as (another value is an error).
        think_suffix: the think variant ends the last user turn with its trained instruction
        (`af3trt.think.THINK_SUFFIX`); False leaves prompts as given."""
        if str(path) == "tiny":
            path = make_tiny_checkpoint(default_tiny_dir())
        path = Path(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        _check_device(device)
        dtype = _dtype(dtype, device)
        if variant is not None:
            check_variant(variant)
        if (path / MANIFEST).is_file():
            return cls._from_engine_dir(path, encoder, decoder, device, dtype, allow_urls, cache_bytes, variant,
                                        think_suffix)
        _pick(encoder, ("torch",), "encoder (an AF3 checkpoint dir has only the torch weights)",
              unavailable_encoders(None))
        dec_name = _pick(decoder, _torch_decoders(device), "decoder",
                         unavailable_decoders(None))
        ckpt = open_checkpoint(path, variant or "base")
        enc = load_encoder("torch", ckpt, device, dtype)
        dec = _TORCH_DECODERS[dec_name].from_checkpoint(ckpt, device, dtype)
        suffix = THINK_SUFFIX if variant == "think" and think_suffix else ""
        builder = PromptBuilder.from_pretrained(path, ckpt.spec.audio_token_id, ckpt.spec.text.vocab_size,
                                                allow_urls=allow_urls, user_suffix=suffix)
        defaults = GenerationDefaults.from_dir(path, builder.tokenizer.eos_token_id)
        return cls(builder, enc, dec, ckpt.spec, defaults, device, cache_bytes=cache_bytes)

    @classmethod
    def _from_engine_dir(cls, path: Path, encoder, decoder, device, dtype, allow_urls, cache_bytes, variant=None,
                         think_suffix=True) -> "Pipeline":
        manifest = Manifest.read(path)
        check_engine_dir(manifest, path)
        built = manifest.variant.get("name", "base")
        if variant is not None and variant != built:
            raise ManifestError(f"expected an engine dir of variant {variant!r}, got {built!r} in {path} "
                                f"(build one with `af3trt build --variant {variant}`)")
        spec = ModelSpec.from_dir(path / "tokenizer")
        enc_name = _pick(encoder, tuple(available_encoders(path)), "encoder", unavailable_encoders(path))
        if enc_name == "torch":
            enc = load_encoder("torch", _source_checkpoint(manifest), device, dtype)
        else:
            enc = load_encoder(enc_name, path, device, dtype)
        base = manifest.engine_vocab_size()
        builder = PromptBuilder.from_pretrained(path / "tokenizer", spec.audio_token_id, base, allow_urls=allow_urls,
                                                user_suffix=manifest.variant.get("suffix", "") if think_suffix else "")
        defaults = GenerationDefaults.from_dir(path / "tokenizer", builder.tokenizer.eos_token_id)
        dec = load_decoder(decoder, path, manifest, spec, device, dtype, defaults.eos_token_ids, builder.pad_token_id)
        if getattr(dec, "vocab_size", base) != base:
            raise ManifestError(f"decoder {dec.name} of {path} has vocab_size {dec.vocab_size}, the manifest's "
                                f"engine_vocab_size (where fake ids start) is {base}")
        return cls(builder, enc, dec, spec, defaults, device, limits=manifest.limits, cache_bytes=cache_bytes,
                   fake_id_base=base)

    # -- stages ---------------------------------------------------------------------------------
    def prepare(self, conversations) -> list[Prompt]:
        if _is_single_conversation(conversations):
            conversations = [conversations]
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise PromptError(f"expected a conversation or a non-empty list of them, got {type(conversations).__name__}")
        return [self.builder.build(c) for c in conversations]

    def encode(self, prompts: list[Prompt]) -> tuple[list[list[torch.Tensor]], list[list[str]], dict[str, float]]:
        """Per prompt, the (rows, hidden) embeddings and content hashes of its audios, in prompt order.

        Audios already in the encoder cache are not encoded again; the others go through the
        encoder together, in one call, as what it takes (`encoder.takes`): their log-mel windows, or
        for "audio" the padded 16 kHz windows themselves (timings["features"] is then the padding).
        """
        digests = [[audio_hash(a.samples) for a in p.audios] for p in prompts]
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, np.ndarray] = {}
        for p, ds in zip(prompts, digests):
            for a, d in zip(p.audios, ds):
                if d in found or d in todo:
                    continue
                hit = self.cache.get(d)
                if hit is not None:
                    found[d] = hit
                else:
                    todo[d] = a.samples
        timings = {"features": 0.0, "encoder": 0.0}
        if todo:
            t0 = time.perf_counter()
            inputs, frames, counts = self._encoder_inputs(list(todo.values()))
            _sync(self.device)
            t1 = time.perf_counter()
            emb = self.encoder(inputs, frames)
            self.encoder_calls += 1
            _sync(self.device)
            t2 = time.perf_counter()
            timings = {"features": t1 - t0, "encoder": t2 - t1}
            rows = valid_rows(frames)
            w = 0
            for d, count in zip(todo, counts):
                found[d] = torch.cat([emb[i, : rows[i]] for i in range(w, w + count)])
                self.cache.put(d, found[d])
                w += count
        return [[found[d] for d in ds] for ds in digests], digests, timings

    def _encoder_inputs(self, audios: list[np.ndarray]) -> tuple[np.ndarray | torch.Tensor, np.ndarray, tuple[int, ...]]:
        """(inputs the encoder takes, (W,) valid frames, windows per audio) for 16 kHz audios."""
        windows, mask, counts = padded_windows(audios)
        frames = mask.sum(axis=1)
        if getattr(self.encoder, "takes", "features") == "audio":
            return windows, frames, counts
        if self.device.type == "cuda":  # af3trt.kernels.logmel on the device; stays there for the encoder
            return log_mel_windows(torch.from_numpy(windows).to(self.device)), frames, counts
        return log_mel(windows).numpy(), frames, counts

    def requests(self, prompts: list[Prompt], opts: GenerationOptions):
        """Stitch prompts into `DecoderRequest`s (checked against the engine limits first)."""
        for p in prompts:
            self.check_limits(p, opts)
        embeddings, digests, timings = self.encode(prompts)
        spec = self.spec
        reqs = [make_request(p, e, d, spec.audio_token_id, self.fake_id_base, opts, spec.text.hidden_size)
                for p, e, d in zip(prompts, embeddings, digests)]
        return reqs, timings

    def check_limits(self, prompt: Prompt, opts: GenerationOptions) -> None:
        """Raise `PromptError` when a request exceeds the engine dir's limits (nothing runs)."""
        error = self.limits.request_error(audio_tokens=prompt.num_audio_tokens, prompt_tokens=len(prompt.input_ids),
                                          max_new_tokens=opts.max_new_tokens)
        if error:
            raise PromptError(error)

    # -- generation -----------------------------------------------------------------------------
    def options(self, **options) -> GenerationOptions:
        """Options of one request: the given ones over the model's generation_config.json defaults
        (`self.defaults`), as HF `generate` resolves them. Unknown names and sampling-only options
        while sampling is off raise `OptionError`. Without max_new_tokens, the engine's own lower
        limit (if any) caps the default; an explicit value over it is refused by check_limits."""
        limit = self.limits.max_new_tokens
        if options.get("max_new_tokens") is None and limit is not None and self.defaults.options().max_new_tokens > limit:
            options = {**options, "max_new_tokens": limit}
        return self.defaults.options(**options)

    def generate(self, conversations, **options) -> list[Result]:
        """Answer one conversation or a batch of them (left-padded together). Returns one Result each.

        options (None or absent = the model's generation_config.json default, as for HF `generate`):
        max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, bad_words (token-id sequences),
        stop (a string or several), seed."""
        results: list[Result] = []
        for _ in self._run(conversations, self.options(**options), False, results):
            pass
        return results

    def stream(self, conversations, **options) -> Iterator:
        """Text pieces as tokens arrive: `str` pieces for one conversation; `(index, piece)` for a
        list of conversations (each conversation's pieces, joined, equal its `generate` text)."""
        single = _is_single_conversation(conversations)
        for index, piece in self._run(conversations, self.options(**options), True, []):
            yield piece if single else (index, piece)

    def stream_result(self, conversation, **options) -> Iterator:
        """One conversation: its text pieces (`str`) as they come, then its `Result`."""
        if not _is_single_conversation(conversation):
            raise PromptError("expected one conversation (a list of messages), got a batch or no messages")
        results: list[Result] = []
        for _, piece in self._run(conversation, self.options(**options), True, results):
            yield piece
        yield results[0]

    def transcribe(self, audio, prompt: str | None = None, strip_prefix: bool = True, **options) -> str:
        conv = [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                              {"type": "text", "text": prompt or DEFAULT_TRANSCRIBE_PROMPT}]}]
        text = self.generate(conv, **options)[0].text
        return strip_transcription_prefix(text) if strip_prefix else text

    def _run(self, conversations, opts: GenerationOptions, streaming: bool, results: list):
        """Yields (index, piece) while streaming; fills `results` with one Result per conversation."""
        t0 = time.perf_counter()
        with self._lock:
            prompts = self.prepare(conversations)
            reqs, timings = self.requests(prompts, opts)
        # Inference mode once per generate, not per step (generation.in_inference_mode); a stream
        # yields to its caller, who must not run in inference mode, so its decoder enters per step.
        with self._decode_lock, contextlib.nullcontext() if streaming else torch.inference_mode():
            gen = torch.Generator(device=self.device)
            if opts.seed is not None:
                gen.manual_seed(opts.seed)
            answers = [AnswerStream(self.tokenizer, opts, streaming) for _ in prompts]
            stats = LoopStats()
            t_first = None
            for _ in read_steps(self.decoder.steps(reqs, gen, stats=stats), answers, every_step=streaming):
                if t_first is None:
                    t_first = time.perf_counter()
                if streaming:
                    for i, answer in enumerate(answers):
                        piece = answer.pending()
                        if piece:
                            yield i, piece
            t_end = time.perf_counter()
        t_first = t_first or t_end
        decode = t_end - t_first
        n = max(len(a.tokens) for a in answers)
        timings = Timings(
            features=timings["features"], encoder=timings["encoder"], total=t_end - t0, ttft=t_first - t0,
            prefill=t_first - t0 - timings["features"] - timings["encoder"], decode=decode,
            tokens_per_second=(n - 1) / decode if n > 1 and decode > 0 else 0.0,
            # torch decoders: time of the loop outside the decoder's step calls, per step
            decode_host_per_step=max(0.0, decode - stats.model_seconds) / stats.steps if stats.steps else None)
        results.extend(Result(a.text, list(a.tokens), p.num_audio_tokens, a.finish_reason or "length", timings,
                              len(p.input_ids), audio_warnings(p.audios)) for a, p in zip(answers, prompts))


def check_engine_dir(manifest, path: Path) -> None:
    """Refuse an engine dir built by another af3trt, from stages of different checkpoints, or missing
    the stages every backend needs; says what differs."""
    built_with = manifest.versions.get("af3trt")
    if built_with != __version__:
        raise ManifestError(f"engine dir {path} was built by af3trt {built_with}, this is af3trt {__version__}: "
                            f"rebuild it with `af3trt build`")
    manifest.require(path, "tokenizer", "llm_checkpoint")
    want = manifest.checkpoint.get("fingerprint")
    for name, entry in manifest.stages.items():
        got = entry.get("checkpoint")
        if got is not None and got != want:
            raise ManifestError(f"stage {name!r} of {path} was built from checkpoint {got}, the manifest says {want}")


def _source_checkpoint(manifest):
    src = manifest.checkpoint.get("path")
    try:
        ckpt = open_checkpoint(src, manifest.variant.get("name", "base"))
    except FileNotFoundError as exc:
        raise ManifestError(f"the torch encoder needs the source checkpoint {src}: {exc}") from exc
    if ckpt.fingerprint() != manifest.checkpoint.get("fingerprint"):
        raise ManifestError(f"checkpoint at {src} changed since the engine dir was built "
                            f"(fingerprint {ckpt.fingerprint()}, manifest {manifest.checkpoint.get('fingerprint')})")
    return ckpt


def available_decoders(path: Path, manifest) -> tuple[str, ...]:
    out = []
    if manifest.stage("llm_engine") and importlib.util.find_spec("tensorrt_llm") and torch.cuda.is_available():
        out.append("tensorrt_llm")
    return tuple(out) + _torch_decoders("cuda" if torch.cuda.is_available() else "cpu")


def _torch_decoders(device) -> tuple[str, ...]:
    """torch-fast (static KV cache, CUDA graphs, GEMV kernels) first on CUDA; the plain reference first on CPU."""
    return ("torch-fast", "torch") if str(device).startswith("cuda") else ("torch", "torch-fast")


_TORCH_DECODERS = {"torch": TorchDecoder, "torch-fast": FastTorchDecoder}


def load_decoder(name: str, path: Path, manifest, spec: ModelSpec, device, dtype, eos, pad_id):
    """Decoder backend for an engine dir: TensorRT-LLM engine, or torch on the TensorRT-LLM checkpoint."""
    name = _pick(name, available_decoders(path, manifest), "decoder", unavailable_decoders(manifest))
    if name == "tensorrt_llm":
        stage = manifest.stages["llm_engine"]
        engine = path / stage["path"]
        check_single_rank(engine_config(engine), engine)
        check_engine(engine_config(engine), manifest.limits, stage.get("tensorrt_llm"),
                     importlib.metadata.version("tensorrt_llm"), manifest.engine_vocab_size())
        config = engine_config(engine)  # block reuse only where the engine kept paged context FMHA
        return TensorRTLLMDecoder(engine, end_id=eos[0], pad_id=pad_id, max_batch_size=manifest.limits.get("max_batch_size"),
                                  valid_vocab=spec.text.vocab_size, enable_block_reuse=kv_reuse_allowed(config))
    return _TORCH_DECODERS[name].from_trtllm_checkpoint(path / manifest.stages["llm_checkpoint"]["path"], spec,
                                                          device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype(dtype, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    floats = ("float32", "bfloat16", "float16")  # the model dtypes (af3trt.dtypes), by name or short name
    table = {alias: DTYPES[n] for n in floats for alias in (n, DTYPES[n].short)}
    if dtype not in table:
        raise OptionError(f"expected dtype in {sorted(table)}, got {dtype!r}")
    return table[dtype].torch
