"""Typed specs of the af3trt Triton repository: tensor lists, model configs, serving limits, the
python models' parameters and their config.pbtxt rendering (`string.Template.substitute`), the
launch record (`LaunchSpec`, read by `af3trt.serving.launch`) and the writer's af3trt version.

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

from .. import __version__
from ..dtypes import DTYPES
from ..errors import UserError
from ..formats.limits import Limits
from ..formats.manifest import MANIFEST, Manifest
from ..spec import MAX_AUDIO_SECONDS, MAX_AUDIO_TOKENS, MAX_WINDOWS

TEMPLATES = Path(__file__).resolve().parent / "templates"
GENERATOR = "af3trt"
MARKER = ".af3trt-repository"  # only folders holding this file (or empty ones) are replaced
LLM_BACKENDS = ("tensorrtllm", "python")
PREPROCESSING, ENCODER, PROMPT_TABLE, LLM, POSTPROCESSING, ENSEMBLE, BLS = (
    "preprocessing", "audio_encoder", "prompt_table", "tensorrt_llm", "postprocessing", "ensemble", "af3")
# numpy/torch dtype name -> Triton TYPE_* (af3trt.dtypes), plus the request-only uint64 seeds / extra ids
# and BYTES strings, which no model tensor has
NUMPY_TO_TRITON = {**{d.name: d.triton for d in DTYPES.values() if d.triton}, "uint64": "TYPE_UINT64",
                   "bytes": "TYPE_STRING"}


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


# The request's generation options, declared once: request input -> (af3trt generation option of
# `GenerationOptions` / `GenerationDefaults.options`, its tensor's dtype). Absent = the model's
# generation_config.json default; errors about an option name the input.
OPTION_INPUTS = {"MAX_TOKENS": ("max_new_tokens", "int32"), "MIN_TOKENS": ("min_new_tokens", "int32"),
                 "DO_SAMPLE": ("do_sample", "bool"), "TEMPERATURE": ("temperature", "float32"),
                 "TOP_P": ("top_p", "float32"), "TOP_K": ("top_k", "int32"), "MIN_P": ("min_p", "float32"),
                 "REPETITION_PENALTY": ("repetition_penalty", "float32"),
                 "PRESENCE_PENALTY": ("presence_penalty", "float32"),
                 "FREQUENCY_PENALTY": ("frequency_penalty", "float32"), "SEED": ("seed", "uint64"),
                 "IGNORE_EOS": ("ignore_eos", "bool"), "STOP": ("stop", "bytes")}
REQUEST_OPTIONS = {name: opt for name, (opt, _) in OPTION_INPUTS.items()}  # request input -> option
# request flags that are no generation option, and their value when absent
REQUEST_FLAGS = {"STREAM": False, "STRIP_PREFIX": False}
# User-facing request (ensemble and af3): AUDIO elements are whole encoded files, never URLs or paths.
# The text comes as PROMPT (one user turn: the audios, then the text) or as CONVERSATION (JSON: the
# messages as `Pipeline.generate` takes them, roles system/user/assistant, each audio item written
# {"type": "audio", "audio": i} with i an index into AUDIO); exactly one of the two. Both are
# declared optional: preprocessing then answers a request with neither (or both) by an error naming
# them, where Triton's ensemble would skip the step and return an empty answer.
REQUEST_INPUTS = (
    tensor("AUDIO", "bytes", -1, optional=True), tensor("AUDIO_BASE64", "bytes", -1, optional=True),
    tensor("PROMPT", "bytes", 1, optional=True), tensor("CONVERSATION", "bytes", 1, optional=True),
    *(tensor(name, dtype, -1 if dtype == "bytes" else 1, optional=True) for name, (_, dtype) in OPTION_INPUTS.items()),
    *(tensor(name, "bool", 1, optional=True) for name in REQUEST_FLAGS),
)
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
# The LLM tensors of TensorRT-LLM SamplingConfig fields (`af3trt.runtime.stitch.trtllm_sampling`), with
# the value that leaves a field at its default: preprocessing sends them, the python LLM reads them.
LLM_SAMPLING = {"top_k": ("runtime_top_k", 0), "top_p": ("runtime_top_p", 1.0), "temperature": ("temperature", 1.0),
                "repetition_penalty": ("repetition_penalty", 1.0), "presence_penalty": ("presence_penalty", 0.0),
                "frequency_penalty": ("frequency_penalty", 0.0), "min_tokens": ("min_tokens", 0)}


def numpy_dtype(triton: str) -> str:
    """A Triton TYPE_* -> its numpy dtype name (NUMPY_TO_TRITON's inverse)."""
    return next(name for name, t in NUMPY_TO_TRITON.items() if t == triton)


TABLE_INPUTS = ("prompt_embedding_table", "prompt_vocab_size")  # from prompt_table, the rest from preprocessing
# A TensorRT-LLM engine's dtype (pretrained_config.dtype) -> the prompt table dtype it accepts.
ENGINE_TABLE_DTYPES = {n: DTYPES[n].triton for n in ("bfloat16", "float16", "float32")}


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
class ServingLimits(Limits):
    """The `Limits` a repository enforces: the engine dir's manifest record, and where there is none
    these serving defaults (8 sequences, 10 minutes of audio, 2048 text and 2048 new tokens).
    Checked per request by `Limits.request_error`, the Pipeline's rule."""

    max_batch_size: int = 8
    max_audio_seconds: float = float(MAX_AUDIO_SECONDS)
    max_windows: int = MAX_WINDOWS
    max_audio_tokens: int = MAX_AUDIO_TOKENS
    max_input_len: int = MAX_AUDIO_TOKENS + 2048
    max_new_tokens: int = 2048
    max_seq_len: int = MAX_AUDIO_TOKENS + 2048 + 2048

    @classmethod
    def from_engine_dir(cls, engine_dir: str | os.PathLike) -> "ServingLimits":
        """Limits of ENGINE_DIR/manifest.json (its `limits` record), defaults where there is none."""
        if not (Path(engine_dir) / MANIFEST).is_file():
            return cls()
        lim = Limits.read(Manifest.read(engine_dir).limits)
        return cls(**{k: v for k, v in lim.items() if v is not None})


# ---------------------------------------------------------------------- the launch record


MIN_POOL_BYTES = 300_000_000  # NVIDIA's multimodal docs (`--multimodal_gpu0_cuda_mem_pool_bytes 300000000`)
LLM_MODEL = "tensorrt_llm"


def pool_bytes(max_audio_tokens: int, hidden_size: int, table_bytes: int, max_batch_size: int) -> int:
    """CUDA memory pool of GPU 0: every in-flight request's largest prompt table, at least 300 MB
    (a 10-minute bf16 table: 15,000 x 3,584 x 2 B = 107.5 MB per request)."""
    return max(MIN_POOL_BYTES, int(max_audio_tokens) * int(hidden_size) * int(table_bytes) * int(max_batch_size))


@dataclass(frozen=True)
class LaunchSpec:
    """How the repository is launched (`af3trt.serving.launch`). world_size: ranks of the LLM engine
    (tp*pp; 1 for the python LLM); cuda_memory_pool_bytes: GPU 0's pool (None: the python-LLM
    repositories, which also run on CPU, set none); tensorrt_llm: the version that built the engine
    (None: not recorded, not checked)."""

    world_size: int = 1
    cuda_memory_pool_bytes: int | None = None
    tensorrt_llm: str | None = None
    cpp_llm: bool = False  # the repository's LLM is the tensorrtllm C++ backend

    def record(self) -> dict:
        return {"world_size": self.world_size, "cuda_memory_pool_bytes": self.cuda_memory_pool_bytes,
                "tensorrt_llm": self.tensorrt_llm, "cpp_llm": self.cpp_llm}


def engine_world_size(engine_config: dict) -> int:
    """tp * pp of a TensorRT-LLM engine config.json (pretrained_config.mapping)."""
    mapping = (engine_config.get("pretrained_config") or {}).get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", tp * pp))
    if world != tp * pp:
        raise ValueError(f"expected mapping.world_size == tp_size * pp_size ({tp} * {pp}), got {world}")
    return world


def _marker(repo: str | os.PathLike) -> dict | None:
    marker = Path(repo) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def read_launch(repo: str | os.PathLike) -> LaunchSpec:
    """The launch record `write_repository` left in the repository's marker file (defaults without one)."""
    record = (_marker(repo) or {}).get("launch")
    return LaunchSpec(**record) if record else LaunchSpec()


# ------------------------------------------------------------------- the writer's version

# Every repository records the af3trt that wrote it (the marker's `af3trt`, each python model's and
# the ensemble's `af3trt_version` parameter): its models import af3trt, so a repository of another
# af3trt (other parameters, other tensors) is refused at load rather than half-working.
VERSION_KEY = "af3trt_version"
REGENERATE = "regenerate it with `af3trt triton`"


class RepositoryVersionError(UserError):
    """A model repository written by another af3trt than the one loading it."""


def version_pairs() -> tuple[tuple[str, str], ...]:
    return ((VERSION_KEY, __version__),)


def _check_version(what: str, written: str | None) -> None:
    if written != __version__:
        raise RepositoryVersionError(f"expected {what} written by af3trt {__version__} (the one loading it), got "
                                     f"{'a repository of af3trt ' + written if written else 'no af3trt version recorded'}"
                                     f": {REGENERATE}")


def check_writer(repo: str | os.PathLike) -> None:
    """Refuse a repository whose marker records another af3trt (none recorded: an older one)."""
    record = _marker(repo)
    if record is not None:
        _check_version(f"the model repository {repo}", record.get("af3trt"))


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
    """Inverse of `param_pairs` for a python model's `args["model_config"]`; unknown keys are an error,
    and so is a model written by another af3trt (its `af3trt_version`)."""
    params = model_config.get("parameters") or {}
    _check_version(f"model {model_config.get('name')!r}", (params.get(VERSION_KEY) or {}).get("string_value"))
    raw = {k: v["string_value"] for k, v in params.items()
           if k != "FORCE_CPU_ONLY_INPUT_TENSORS" and k not in VARIANT_KEYS and k != VERSION_KEY}
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
