"""Typed specs of the af3trt Triton repository: tensor lists, model configs, serving limits, the
python models' parameters and their config.pbtxt rendering (`string.Template.substitute`).

Light on purpose: the generated python models import their parameter classes from here inside
the Triton server. `af3trt.build.triton` inspects the engine dir and writes the repository.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionError
from ..spec import MAX_AUDIO_SECONDS, MAX_AUDIO_TOKENS, MAX_WINDOWS, check_limit_fields

TEMPLATES = Path(__file__).resolve().parent / "templates"
GENERATOR = "af3trt"
MARKER = ".af3trt-repository"  # only folders holding this file (or empty ones) are replaced
LLM_BACKENDS = ("tensorrtllm", "python")
PREPROCESSING, ENCODER, PROMPT_TABLE, LLM, POSTPROCESSING, ENSEMBLE, BLS = (
    "preprocessing", "audio_encoder", "prompt_table", "tensorrt_llm", "postprocessing", "ensemble", "af3")
NUMPY_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                   "int32": "TYPE_INT32", "uint64": "TYPE_UINT64", "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}


# ------------------------------------------------------------------------------------ typed specs


@dataclass(frozen=True)
class TensorSpec:
    """One config.pbtxt input/output. dtype: a Triton TYPE_*; dims exclude the batch axis."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None
    ragged: bool = False

    def __post_init__(self):
        if self.dtype not in NUMPY_TO_TRITON.values():
            raise ValueError(f"{self.name}: expected a dtype in {sorted(NUMPY_TO_TRITON.values())}, got {self.dtype!r}")


def tensor(name, dtype, *dims, **kw) -> TensorSpec:
    return TensorSpec(name, NUMPY_TO_TRITON[dtype], tuple(dims), **kw)


def _scalar(name, dtype, optional=True) -> TensorSpec:
    """A per-request scalar of a batching model: dims [1], reshaped to [] (the C++ backend's layout)."""
    return TensorSpec(name, NUMPY_TO_TRITON[dtype], (1,), optional=optional, reshape=())


# User-facing request (ensemble and af3): AUDIO elements are whole encoded files, never URLs or paths.
# The text comes as PROMPT (one user turn: the audios, then the text) or as CONVERSATION (JSON: the
# messages as `Pipeline.generate` takes them, roles system/user/assistant, each audio item written
# {"type": "audio", "audio": i} with i an index into AUDIO); exactly one of the two. Both are
# declared optional: preprocessing then answers a request with neither (or both) by an error naming
# them, where Triton's ensemble would skip the step and return an empty answer.
REQUEST_INPUTS = (
    tensor("AUDIO", "bytes", -1, optional=True), tensor("AUDIO_BASE64", "bytes", -1, optional=True),
    tensor("PROMPT", "bytes", 1, optional=True), tensor("CONVERSATION", "bytes", 1, optional=True),
    tensor("MAX_TOKENS", "int32", 1, optional=True), tensor("MIN_TOKENS", "int32", 1, optional=True),
    tensor("DO_SAMPLE", "bool", 1, optional=True), tensor("TEMPERATURE", "float32", 1, optional=True),
    tensor("TOP_P", "float32", 1, optional=True), tensor("TOP_K", "int32", 1, optional=True),
    tensor("MIN_P", "float32", 1, optional=True),
    tensor("REPETITION_PENALTY", "float32", 1, optional=True),
    tensor("PRESENCE_PENALTY", "float32", 1, optional=True), tensor("FREQUENCY_PENALTY", "float32", 1, optional=True),
    tensor("SEED", "uint64", 1, optional=True), tensor("IGNORE_EOS", "bool", 1, optional=True),
    tensor("STOP", "bytes", -1, optional=True),
    tensor("STREAM", "bool", 1, optional=True), tensor("STRIP_PREFIX", "bool", 1, optional=True),
)
# request input -> af3trt generation option (`GenerationDefaults.options`; absent = the model's
# generation_config.json default). Errors about an option name the input.
REQUEST_OPTIONS = {"MAX_TOKENS": "max_new_tokens", "MIN_TOKENS": "min_new_tokens", "DO_SAMPLE": "do_sample",
                   "TEMPERATURE": "temperature", "TOP_P": "top_p", "TOP_K": "top_k", "MIN_P": "min_p",
                   "REPETITION_PENALTY": "repetition_penalty", "PRESENCE_PENALTY": "presence_penalty",
                   "FREQUENCY_PENALTY": "frequency_penalty", "SEED": "seed", "IGNORE_EOS": "ignore_eos",
                   "STOP": "stop"}
# Inputs only `af3` reads: stop strings are checked on the detokenized text, which the ensemble never
# sees (its LLM stops on token ids only); the ensemble does not declare them, so Triton refuses them there.
BLS_ONLY_INPUTS = ("STOP",)
REQUEST_OUTPUTS = (tensor("TEXT", "bytes", -1),)
# `af3` also answers, beside TEXT (in the final response when streaming): FINISH_REASON ("stop": an
# end id or a stop string, "length": MAX_TOKENS reached), PROMPT_TOKENS (audio rows included),
# AUDIO_TOKENS and COMPLETION_TOKENS (the end id included, as `Result.token_ids` counts it), and
# WARNINGS (BYTES [n], only when there are any; first when streaming): what was done to the request
# that the client should know, e.g. audio past the model's 10 minutes truncated, or a file that
# decoded to less than its header declares. Preprocessing hands them on as its `warnings` output.
BLS_OUTPUTS = REQUEST_OUTPUTS + (tensor("FINISH_REASON", "bytes", 1), tensor("PROMPT_TOKENS", "int32", 1),
                                 tensor("AUDIO_TOKENS", "int32", 1), tensor("COMPLETION_TOKENS", "int32", 1),
                                 tensor("WARNINGS", "bytes", -1))
# The ensemble's outputs: TEXT (postprocessing) and, in a repository without streaming, WARNINGS
# (preprocessing's, always sent: [0] when none). A streaming (decoupled) ensemble cannot carry
# WARNINGS: Triton refuses an ensemble whose outputs originate from different decoupled models
# ("step of model 'ensemble' receives inputs originated from different decoupled models"; here the
# LLM and preprocessing), so there preprocessing refuses a request it would have to warn about,
# unless `af3` asks (RETURNS_WARNINGS), which returns them itself.
ENSEMBLE_OUTPUTS = REQUEST_OUTPUTS + (tensor("WARNINGS", "bytes", -1),)
RETURNS_WARNINGS = tensor("returns_warnings", "bool", 1, optional=True)  # af3 -> preprocessing only

# The TensorRT-LLM C++ backend's tensors this repository uses: names, dtypes and dims as in TensorRT-LLM
# 1.2 triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt (input_ids is optional
# there; this repository always sends it). bad_words_list has stop_words_list's layout. The python LLM backend declares exactly these.
# Preprocessing emits the per-request ones under the same names. How the C++ backend reads them
# (inflight_batcher_llm/src/utils.cc): scalars by their exact dtype; stop_words_list [2, K] = ids row +
# cumulative end offsets, -1 padded; prompt_embedding_table [rows, H] must be in the ENGINE's dtype
# (the executor rejects another); prompt_table_extra_ids are used only when there is one per input
# id (else dropped, and a reuse-enabled executor then refuses the request); prompt_vocab_size is not
# read (the executor takes the table's rows) but the python backend uses it; streaming needs a
# decoupled model; end_id never appears in output_ids. prompt_embedding_table is declared FP16 here
# (the python LLM backend's dtype); `llm_inputs(table_dtype)` gives the set for another table dtype.
LLM_INPUTS = (
    tensor("input_ids", "int32", -1, ragged=True), _scalar("input_lengths", "int32", optional=False),
    _scalar("request_output_len", "int32", optional=False), _scalar("end_id", "int32"), _scalar("pad_id", "int32"),
    tensor("stop_words_list", "int32", 2, -1, optional=True, ragged=True),
    tensor("bad_words_list", "int32", 2, -1, optional=True, ragged=True), _scalar("runtime_top_k", "int32"),
    _scalar("runtime_top_p", "float32"), _scalar("temperature", "float32"), _scalar("repetition_penalty", "float32"),
    _scalar("presence_penalty", "float32"), _scalar("frequency_penalty", "float32"), _scalar("min_tokens", "int32"), _scalar("seed", "uint64"), _scalar("streaming", "bool"),
    tensor("prompt_embedding_table", "float16", -1, -1, optional=True, ragged=True),
    _scalar("prompt_vocab_size", "int32"), tensor("prompt_table_extra_ids", "uint64", -1, optional=True, ragged=True),
)
LLM_OUTPUTS = (tensor("output_ids", "int32", -1, -1), tensor("sequence_length", "int32", -1))
TABLE_INPUTS = ("prompt_embedding_table", "prompt_vocab_size")  # from prompt_table, the rest from preprocessing
# A TensorRT-LLM engine's dtype (pretrained_config.dtype) -> the prompt table dtype it accepts.
ENGINE_TABLE_DTYPES = {"bfloat16": "TYPE_BF16", "float16": "TYPE_FP16", "float32": "TYPE_FP32"}


def llm_inputs(table_dtype: str) -> tuple[TensorSpec, ...]:
    """LLM_INPUTS with prompt_embedding_table in `table_dtype` (a Triton TYPE_* of ENGINE_TABLE_DTYPES)."""
    if table_dtype not in ENGINE_TABLE_DTYPES.values():
        raise ValueError(f"expected a prompt table dtype in {sorted(ENGINE_TABLE_DTYPES.values())}, "
                         f"got {table_dtype!r}")
    return tuple(dataclasses.replace(t, dtype=table_dtype) if t.name == "prompt_embedding_table" else t
                 for t in LLM_INPUTS)


def word_list(words) -> "np.ndarray":
    """Token-id sequences -> TensorRT-LLM's [1, 2, K] int32 word list: row 0 the ids one after another,
    row 1 each word's end offset, -1 padded (an empty list: [[[0], [-1]]])."""
    import numpy as np

    ids = [int(t) for w in words for t in w]
    if not ids:
        return np.array([[[0], [-1]]], np.int32)
    ends = np.cumsum([len(w) for w in words]).tolist()
    return np.array([[ids, ends + [-1] * (len(ids) - len(ends))]], np.int32)


def words_of(word_list) -> list[tuple[int, ...]]:
    """Inverse of `word_list` for a [.., 2, K] array (None: no words)."""
    if word_list is None:
        return []
    ids, offsets = word_list.reshape(2, -1)
    out, start = [], 0
    for end in offsets:
        if end < 0:
            break
        out.append(tuple(int(t) for t in ids[start:int(end)]))
        start = int(end)
    return out


def from_preprocessing(spec: TensorSpec) -> TensorSpec:
    """The preprocessing output (max_batch_size 0) feeding LLM input `spec`: explicit leading batch 1."""
    dims = (1,) + (spec.reshape if spec.reshape is not None else spec.dims)
    return TensorSpec(spec.name, spec.dtype, dims if dims != (1,) else (1, 1))


@dataclass(frozen=True)
class EncoderIO:
    """The encoder's tensor names and Triton dtypes (ENGINE_DIR/encoder/config.json, else defaults)."""

    features: str
    frames: str
    embeddings: str
    features_dtype: str
    frames_dtype: str
    embeddings_dtype: str


@dataclass(frozen=True)
class ModelConfig:
    """A non-ensemble config.pbtxt. backend: 'backend: "python"' or 'platform: "tensorrt_plan"' line."""

    name: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    decoupled: bool | None = None
    dynamic_batching: str = ""
    parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Step:
    model: str
    input_map: tuple[tuple[str, str], ...]  # (model input, ensemble tensor)
    output_map: tuple[tuple[str, str], ...]  # (model output, ensemble tensor)


@dataclass(frozen=True)
class ServingLimits:
    """Per-request limits the repository enforces (from ENGINE_DIR/manifest.json `limits` when present).

    max_batch_size: sequences in flight in the LLM; max_audio_seconds: audio per request (all of its
    audios together); max_windows: 30 s encoder windows per request; max_audio_tokens: prompt-table
    rows per request (the executor's max_prompt_embedding_table_size // max_batch_size); max_input_len:
    prompt tokens (audio rows + text); max_new_tokens: per request; max_seq_len: prompt + new tokens.
    Checked per request by `af3trt.spec.request_limit_error`, the Pipeline's rule.
    """

    max_batch_size: int = 8
    max_audio_seconds: float = float(MAX_AUDIO_SECONDS)
    max_windows: int = MAX_WINDOWS
    max_audio_tokens: int = MAX_AUDIO_TOKENS
    max_input_len: int = MAX_AUDIO_TOKENS + 2048
    max_new_tokens: int = 2048
    max_seq_len: int = MAX_AUDIO_TOKENS + 2048 + 2048
    max_text_tokens: int | None = None  # prompt tokens besides audio (the engine's; None: only the total)

    def __post_init__(self):
        check_limit_fields("ServingLimits", self, ("max_batch_size", "max_windows", "max_audio_tokens", "max_input_len",
                                                   "max_new_tokens", "max_seq_len")
                           + (("max_text_tokens",) if self.max_text_tokens is not None else ()))
        if self.max_seq_len <= self.max_input_len:
            raise OptionError(f"ServingLimits: expected max_seq_len > max_input_len, got {self.max_seq_len} "
                             f"<= {self.max_input_len}")

    @classmethod
    def from_engine_dir(cls, engine_dir: str | os.PathLike) -> "ServingLimits":
        """Limits of ENGINE_DIR/manifest.json (its `limits` record), defaults where there is none."""
        path = Path(engine_dir) / "manifest.json"
        if not path.is_file():
            return cls()
        from ..formats.manifest import Manifest

        lim = Manifest.read(engine_dir).limits
        picked = {k: lim[k] for k in ("max_batch_size", "max_audio_seconds", "max_windows", "max_audio_tokens",
                                      "max_input_len", "max_new_tokens", "max_seq_len", "max_text_tokens")
                  if lim.get(k) is not None}
        if "max_audio_seconds" in picked:
            picked["max_audio_seconds"] = float(picked["max_audio_seconds"])
        return cls(**picked)


# -------------------------------------------------------------- python model parameters (typed)


def param_pairs(obj) -> tuple[tuple[str, str], ...]:
    """A params dataclass -> config.pbtxt parameters (strings as-is, everything else as JSON)."""
    return tuple((f.name, v if isinstance(v := getattr(obj, f.name), str) else json.dumps(v))
                 for f in dataclasses.fields(obj))


# Model metadata on every af3trt python model and the ensemble (config parameters, the model config API
# shows them): the engine dir's variant ("base" | "think") and its adapter hash ("" for base).
VARIANT_KEYS = ("variant", "variant_adapter")


def variant_pairs(variant: dict) -> tuple[tuple[str, str], ...]:
    """manifest.variant -> the metadata parameters."""
    return (("variant", variant.get("name", "base")), ("variant_adapter", variant.get("adapter", "")))


def model_variant(model_config: dict) -> str:
    """The variant a python model serves (its `variant` parameter; "base" where there is none)."""
    return ((model_config.get("parameters") or {}).get("variant") or {}).get("string_value", "base")


def load_params(cls, model_config: dict):
    """Inverse of `param_pairs` for a python model's `args["model_config"]`; unknown keys are an error."""
    raw = {k: v["string_value"] for k, v in (model_config.get("parameters") or {}).items()
           if k != "FORCE_CPU_ONLY_INPUT_TENSORS" and k not in VARIANT_KEYS}
    names = {f.name: f for f in dataclasses.fields(cls)}
    if set(raw) != set(names):
        raise ValueError(f"{model_config.get('name')}: expected parameters {sorted(names)}, got {sorted(raw)}")
    return cls(**{k: v if names[k].type in ("str", str) else json.loads(v) for k, v in raw.items()})


@dataclass(frozen=True)
class PreprocessingParams:
    tokenizer_dir: str
    vocab_size: int
    valid_vocab: int  # the model's vocab: [valid_vocab, vocab_size) padded ids go to the LLM as bad words
    audio_token_id: int
    end_id: int
    pad_id: int
    stop_ids: list
    limits: dict
    features: str
    frames: str
    features_dtype: str
    frames_dtype: str
    llm_decoupled: bool  # the LLM streams only when decoupled: STREAM=true is sent on as false otherwise


@dataclass(frozen=True)
class EncoderParams:
    backend: str  # onnxruntime | torch
    path: str  # engine dir (onnxruntime) or AF3 checkpoint dir (torch)
    device: str
    features: str
    frames: str
    embeddings: str


@dataclass(frozen=True)
class PromptTableParams:
    hidden_size: int
    embeddings: str
    dtype: str  # the table's torch dtype name: float16 | bfloat16 | float32 (the LLM's prompt table dtype)


@dataclass(frozen=True)
class LLMParams:
    path: str  # ENGINE_DIR (its llm/checkpoint) or an AF3 checkpoint dir
    device: str
    dtype: str
    audio_token_id: int  # fake ids read as this id in the repetition penalty's history, as HF does


@dataclass(frozen=True)
class PostprocessingParams:
    tokenizer_dir: str


@dataclass(frozen=True)
class BLSParams:
    tokenizer_dir: str
    preprocessing_inputs: list
    llm_inputs: list
    encoder_inputs: list
    embeddings: str
    llm_decoupled: bool
    workers: int


# ------------------------------------------------------------------------------------- rendering

_INPUT = string.Template("  {\n    name: \"${name}\"\n    data_type: ${dtype}\n    dims: ${dims}${extra}\n  }")
_PARAM = string.Template("parameters: {\n  key: \"${key}\"\n  value: { string_value: \"${value}\" }\n}")
_STEP = string.Template("    {\n      model_name: \"${model}\"\n      model_version: -1\n${maps}\n    }")
_MAP = string.Template("      ${kind} { key: \"${key}\" value: \"${value}\" }")


def _quote(value: str) -> str:
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"expected a single-line printable parameter value, got {value!r}")
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _dims(dims) -> str:
    return f"[ {', '.join(str(d) for d in dims)} ]" if dims else "[ ]"


def render_tensor(t: TensorSpec, is_input: bool) -> str:
    extra = ""
    if t.reshape is not None:
        extra += f"\n    reshape: {{ shape: {_dims(t.reshape)} }}"
    if is_input and t.optional:
        extra += "\n    optional: true"
    if is_input and t.ragged:
        extra += "\n    allow_ragged_batch: true"
    return _INPUT.substitute(name=t.name, dtype=t.dtype, dims=_dims(t.dims), extra=extra)


def render_model(cfg: ModelConfig) -> str:
    template = string.Template((TEMPLATES / "model.pbtxt").read_text())
    policy = "" if cfg.decoupled is None else \
        f"model_transaction_policy {{\n  decoupled: {str(cfg.decoupled).lower()}\n}}\n"
    return template.substitute(
        generator=GENERATOR, name=cfg.name, backend=cfg.backend, max_batch_size=cfg.max_batch_size,
        transaction_policy=policy, dynamic_batching=cfg.dynamic_batching,
        inputs=",\n".join(render_tensor(t, True) for t in cfg.inputs),
        outputs=",\n".join(render_tensor(t, False) for t in cfg.outputs),
        instance_count=cfg.instance_count, instance_kind=cfg.instance_kind,
        parameters="\n".join(_PARAM.substitute(key=k, value=_quote(v)) for k, v in cfg.parameters),
    )


def render_ensemble(name: str, inputs, outputs, steps: list[Step], parameters: tuple = ()) -> str:
    template = string.Template((TEMPLATES / "ensemble.pbtxt").read_text())
    blocks = []
    for s in steps:
        maps = [_MAP.substitute(kind="input_map", key=k, value=v) for k, v in s.input_map]
        maps += [_MAP.substitute(kind="output_map", key=k, value=v) for k, v in s.output_map]
        blocks.append(_STEP.substitute(model=s.model, maps="\n".join(maps)))
    return template.substitute(generator=GENERATOR, name=name, inputs=",\n".join(render_tensor(t, True) for t in inputs),
                               outputs=",\n".join(render_tensor(t, False) for t in outputs), steps=",\n".join(blocks),
                               parameters="\n".join(_PARAM.substitute(key=k, value=_quote(v)) for k, v in parameters))



# ------------------------------------------------------------------------------ request checks

# Marks an error message of af3trt's python models that is not the request's fault (a bug, a broken
# install): the decoupled gRPC stream carries messages only, no status, so clients (the OpenAI
# server's Triton backend: 500, not 400) tell the two apart by it.
INTERNAL_ERROR = "af3trt internal error"


def internal_error(exc: BaseException) -> str:
    return f"{INTERNAL_ERROR} ({type(exc).__name__}): {exc}"



def unknown_request_keys(parameters_json: str) -> str | None:
    """The error for a request carrying parameters (`request.parameters()`, JSON): the HTTP generate
    endpoint turns every JSON key that names no input into a parameter, so a typo such as
    "MAX_TOKEN" arrives there. The repository's models read none, so every one is refused."""
    params = json.loads(parameters_json or "{}")
    if not params:
        return None
    inputs = [t.name for t in REQUEST_INPUTS]
    return (f"expected request keys among the inputs {inputs}, got unknown keys {sorted(params)} "
            f"(sent as request parameters, which this model does not read)")
