"""The one stitching module: prompt + audio embeddings -> what every decoder backend receives.

A `DecoderRequest` is TensorRT-LLM's prompt-tuning request in backend-neutral form (DESIGN §4):
`input_ids` with fake ids `vocab_size + row`, the request's own prompt `table` [rows, hidden],
and `extra_ids` (one positive id per audio, repeated at its fake-token positions, 0 elsewhere) so
that a later turn on the same audio can reuse its KV-cache blocks. The torch backend consumes
exactly these fields; `executor_arguments` lays them out as the TensorRT-LLM executor's `Request`
keywords, so CPU tests can prove both receive the same thing.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..prompt import Prompt, fake_ids
from .generation import GenerationOptions

EXTRA_ID_BITS = 62  # extra ids are uint64 > 0 in TensorRT-LLM; stay clear of the sign bit of int64 tensors


def audio_hash(samples: np.ndarray) -> str:
    """Content hash of 16 kHz float32 samples (the encoder-cache key and the source of extra ids)."""
    data = np.ascontiguousarray(samples, dtype=np.float32)
    return hashlib.sha256(data.tobytes()).hexdigest()


def extra_id(digest: str) -> int:
    """Positive 62-bit id of an audio's content hash (same audio, same id)."""
    return (int(digest[:16], 16) & ((1 << EXTRA_ID_BITS) - 1)) or 1


def extra_ids(is_audio: np.ndarray, audio_tokens: Sequence[int], digests: Sequence[str]) -> np.ndarray:
    """(T,) int64 `input_token_extra_ids`: audio k's `extra_id(digests[k])` at each of its
    `audio_tokens[k]` placeholder positions (`is_audio`, (T,) bool, in prompt order), 0 on text."""
    extra = np.zeros(np.shape(is_audio), dtype=np.int64)
    where = np.flatnonzero(is_audio)
    extra[where] = np.repeat([extra_id(d) for d in digests], audio_tokens).astype(np.int64)
    return extra


@dataclass
class DecoderRequest:
    """input_ids (T,) int64 with fake ids; table (rows, hidden); extra_ids (T,) int64 (0 on text);
    prompt_ids (T,) the same prompt as HF sees it (the `<sound>` id at every audio row): the history
    of HF's repetition penalty."""

    input_ids: np.ndarray
    table: torch.Tensor
    extra_ids: np.ndarray
    options: GenerationOptions
    audio_rows: list[int] = field(default_factory=list)
    prompt_ids: np.ndarray | None = None

    def __post_init__(self):
        if self.prompt_ids is None:
            raise ValueError("expected the prompt's HF ids (prompt_ids), got none: use make_request or hf_prompt_ids")

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[0])


def make_request(prompt: Prompt, embeddings: list[torch.Tensor], digests: list[str], audio_token_id: int,
                 vocab_size: int, options: GenerationOptions, hidden: int) -> DecoderRequest:
    """Stitch one prompt: embeddings[k] (rows_k, hidden) of its k-th audio, in prompt order."""
    if len(embeddings) != len(prompt.audios) or len(digests) != len(prompt.audios):
        raise ValueError(f"expected {len(prompt.audios)} audio embeddings and hashes, got {len(embeddings)}, {len(digests)}")
    for k, (emb, rows) in enumerate(zip(embeddings, prompt.audio_tokens)):
        if emb.shape[0] != rows:
            raise ValueError(f"audio {k}: {rows} placeholders but {emb.shape[0]} embedding rows")
    ids = np.asarray(prompt.input_ids, dtype=np.int64)
    extra = extra_ids(ids == audio_token_id, prompt.audio_tokens, digests)
    table = torch.cat(embeddings) if embeddings else torch.zeros((0, hidden))
    return DecoderRequest(fake_ids(ids, audio_token_id, vocab_size), table, extra, options, list(prompt.audio_tokens),
                          prompt_ids=ids)


def hf_prompt_ids(input_ids: np.ndarray, vocab_size: int, audio_token_id: int) -> np.ndarray:
    """Fake-id prompt -> the ids HF's history holds (every prompt-table row is the `<sound>` id)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    return np.where(ids >= vocab_size, audio_token_id, ids)


def trtllm_sampling(o: GenerationOptions) -> dict:
    """`GenerationOptions` -> keyword arguments of TensorRT-LLM 1.2's `executor.SamplingConfig` (None =
    not sent, the executor's default). The one mapping of options to TensorRT-LLM: the in-process
    executor and the Triton repository (its LLM tensors) both use it.

    Sampling follows the executor's defaults (top_k 0, top_p 0.0, and top_k == 0 with top_p == 0 is
    greedy): greedy sends top_k=1; sampling always sends top_p (1.0 = whole distribution) so that a
    plain temperature sample is not turned into greedy. Penalties and min_tokens apply under greedy
    too, as in HF. Where TensorRT-LLM's semantics differ from the torch backends (HF's), the README's
    table says how.
    """
    sample = o.do_sample
    return {"beam_width": 1, "temperature": o.temperature if sample else None,
            "top_k": o.top_k if sample else 1, "top_p": o.top_p if sample else None,
            "min_p": o.min_p if sample and o.min_p else None,
            "repetition_penalty": o.repetition_penalty if o.repetition_penalty != 1.0 else None,
            "presence_penalty": o.presence_penalty or None, "frequency_penalty": o.frequency_penalty or None,
            "min_tokens": o.min_new_tokens or None, "seed": o.seed}


def request_seed(o: GenerationOptions) -> int | None:
    """The seed a TensorRT-LLM request samples with: the caller's, else (sampling) a fresh 63-bit one,
    since the executor's default seed is 0 for every request; None for greedy (`trtllm_sampling`'s top_k 1)."""
    if o.seed is not None:
        return o.seed
    return None if trtllm_sampling(o)["top_k"] == 1 else secrets.randbits(63)


def executor_arguments(req: DecoderRequest, end_id: int, pad_id: int, streaming: bool = False,
                       valid_vocab: int | None = None, vocab_size: int | None = None) -> dict:
    """Keyword arguments of `tensorrt_llm.bindings.executor.Request` (TensorRT-LLM 1.2 bindings) for
    `req`, as plain Python/torch values; the TensorRT-LLM backend wraps `sampling_config`,
    `output_config` and `prompt_tuning_config` in their binding types. Fake ids start at vocab_size
    per request (the executor gives every request its own table; prompt_vocab_size = table rows).

    Sampling: `trtllm_sampling`. end_id is never in the output (generation stops before it); the
    other stop ids are single-token stop words, which do appear in the output; bad words are banned
    for the whole request. Stop strings are not sent: the host stops reading (and cancels) where the
    text holds one. `input_token_extra_ids` (uint64 per prompt token, > 0 on an audio's fake ids) is
    what KV-cache block reuse with a prompt table requires: the executor rejects such a request
    without it.

    valid_vocab < vocab_size (the engine's vocab, padded by ModelOpt for int4_awq): the padded ids
    [valid_vocab, vocab_size) go in as single-token `bad_words` too, so they are never generated. The
    executor masks only what TensorRT-LLM pads for TP (vocabSizePadded above the engine's
    vocab_size); to it the ModelOpt rows are ordinary ids whose zero lm_head rows score logit 0.
    """
    o = req.options
    args = {
        "input_token_ids": req.input_ids.tolist(),
        "max_tokens": o.max_new_tokens,
        "streaming": streaming,
        "end_id": -1 if o.ignore_eos else end_id,  # -1: no end id (TensorRT-LLM's way to ignore eos)
        "pad_id": pad_id,
        "bad_words": [list(w) for w in o.bad_words] or None,
        "stop_words": None if o.ignore_eos else ([[i] for i in o.eos_token_ids if i != end_id] or None),
        "sampling_config": trtllm_sampling(o),
        "output_config": {"exclude_input_from_output": True},  # non-streaming results: new tokens only
        "prompt_tuning_config": None,
    }
    if valid_vocab is not None and vocab_size is not None and valid_vocab < vocab_size:
        args["bad_words"] = (args["bad_words"] or []) + [[i] for i in range(valid_vocab, vocab_size)]
    if req.table.shape[0]:
        args["prompt_tuning_config"] = {"embedding_table": req.table,
                                        "input_token_extra_ids": req.extra_ids.tolist()}
    return args
