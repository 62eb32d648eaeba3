"""Triton model repository for AF3: `write_repository(engine_dir, out_dir, ...)` (`af3trt triton`).
Every config.pbtxt is rendered from the typed specs of `triton_spec`; the models, the prompt-table
design and the extra ids are described in docs/architecture.md ("The Triton repository")."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..dtypes import DTYPES, dtype
from ..errors import ExistingOutputError, MissingInputError, OptionError
from ..fileio import staged_dir
from ..formats.encoder_io import IO, EncoderIO, read_config
from ..formats.manifest import MANIFEST, Manifest
from ..formats.trtllm_engine import kv_reuse_allowed
from ..spec import FRAMES_PER_WINDOW, N_MELS, TOKENS_PER_WINDOW, ModelSpec
from .triton_spec import (  # also the names callers import from here
    BLS, BLSParams, ENCODER, ENGINE_TABLE_DTYPES, ENSEMBLE, EncoderParams, LLM, LLMParams, LLM_BACKENDS, LaunchSpec,
    LLM_INPUTS, LLM_OUTPUTS, MARKER, ModelConfig, NUMPY_TO_TRITON, POSTPROCESSING, PREPROCESSING, PROMPT_TABLE,
    BLS_ONLY_INPUTS, BLS_OUTPUTS, ENSEMBLE_OUTPUTS, RETURNS_WARNINGS, PostprocessingParams, PreprocessingParams, PromptTableParams, REQUEST_INPUTS, REQUEST_OUTPUTS,
    ServingLimits, Step, TABLE_INPUTS, TEMPLATES, TensorSpec, from_preprocessing, llm_inputs, numpy_dtype, param_pairs, tensor,
    engine_world_size, pool_bytes, render_ensemble, render_model, variant_pairs, version_pairs,
)


# --------------------------------------------------------------------------- engine dir facts


@dataclass(frozen=True)
class EngineFacts:
    """What the writer reads from an engine dir (DESIGN §3) or a plain AF3 checkpoint dir."""

    engine_dir: Path
    tokenizer_dir: Path
    vocab_size: int  # where fake ids start: the LLM checkpoint's (maybe padded) vocab, the model's for a checkpoint dir
    valid_vocab: int  # the model's vocab: ids from here to vocab_size (ModelOpt's padding) are never generated
    hidden_size: int
    audio_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_id: int
    checkpoint_dir: Path | None  # AF3 HF checkpoint (torch encoder / decoder)
    encoder_onnx: Path | None
    encoder_plan: Path | None
    encoder_io: EncoderIO  # the encoder I/O contract (names, numpy dtype names)
    embeddings_dtype: str  # the encoder's output, a Triton TYPE_* (the plan's; FP32 for ONNX / torch)
    plan_max_windows: int | None
    llm_engine: Path | None
    llm_checkpoint: Path | None
    limits: ServingLimits
    variant: dict = field(default_factory=lambda: {"name": "base"})  # manifest.variant (af3trt.think)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _model_facts(root: Path, tokenizer_dir: Path) -> dict:
    if (root / MANIFEST).is_file():
        manifest = Manifest.read(root)
        # as `af3trt run` does: an engine dir serves its own LLM weights, never the source checkpoint's
        # in their place (an interrupted int4_awq build has no llm_checkpoint stage)
        manifest.require(root, "llm_checkpoint")
        m = manifest.model  # fake ids start at the LLM checkpoint's vocab_size (padded for int4_awq)
        return {"vocab_size": manifest.engine_vocab_size(), "valid_vocab": int(m["vocab_size"]),
                "hidden_size": int(m["hidden_size"]), "audio_token_id": int(m["audio_token_id"])}
    for d in (root, tokenizer_dir):
        if (d / "config.json").is_file():
            spec = ModelSpec.from_dir(d)
            return {"vocab_size": spec.text.vocab_size, "valid_vocab": spec.text.vocab_size,
                    "hidden_size": spec.text.hidden_size, "audio_token_id": spec.audio_token_id}
    raise MissingInputError(f"expected manifest.json (engine dir) or an AF3 config.json in {root}, found neither")


def _generation_ids(root: Path, tokenizer_dir: Path) -> tuple[tuple[int, ...], int]:
    for d in (tokenizer_dir, root):
        gen = _json(d / "generation_config.json")
        eos = gen.get("eos_token_id")
        if eos is not None:
            eos = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
            pad = gen.get("pad_token_id")
            return eos, int(pad if pad is not None else eos[0])
    raise MissingInputError(f"expected generation_config.json with eos_token_id in {tokenizer_dir} or {root}, found none")


def _encoder_facts(enc: Path) -> tuple[EncoderIO, str, int | None]:
    """The encoder I/O contract (tensor names, dtypes), its output's Triton dtype and the plan's profile
    maximum, from encoder/config.json (its `io` section, the `plan` section's TensorRT I/O dtypes and
    profile) or formats.encoder_io.IO's defaults."""
    if not (enc / "config.json").is_file():
        return IO, NUMPY_TO_TRITON["float32"], None
    cfg = read_config(enc)
    takes = (cfg.get("io") or {}).get("takes", "features")
    if takes != "features":
        raise ValueError(f"the Triton repository supports features-input encoders only: expected io.takes "
                         f"'features' in {enc / 'config.json'}, got {takes!r} (rebuild with af3trt build "
                         f"--encoder-input features)")
    inputs, outputs = (cfg.get("io") or {}).get("inputs") or {}, (cfg.get("io") or {}).get("outputs") or {}
    by_rank = {len(v["shape"]): k for k, v in inputs.items()}
    if sorted(by_rank) != [1, 3] or len(outputs) != 1:
        raise ValueError(f"expected encoder inputs (W,128,3000) features and (W,) frames and one output in "
                         f"{enc / 'config.json'}, got inputs {inputs} and outputs {outputs}")
    dtypes = {k: dtype(v["dtype"]).name for k, v in {**inputs, **outputs}.items()}
    plan = cfg.get("plan") or {}
    dtypes.update({k: dtype(v).name for k, v in (plan.get("io") or {}).items()})  # TensorRT names: "HALF"
    (emb,) = outputs
    io = dataclasses.replace(IO, features=by_rank[3], frames=by_rank[1], embeddings=emb,
                             features_dtype=dtypes[by_rank[3]], frames_dtype=dtypes[by_rank[1]])
    top = (plan.get("profile") or {}).get("max")
    return io, NUMPY_TO_TRITON[dtypes[emb]], (int(top) if top else None)


def inspect_engine_dir(engine_dir: str | os.PathLike) -> EngineFacts:
    root = Path(engine_dir).resolve()
    if not root.is_dir():
        raise MissingInputError(f"expected an engine dir or AF3 checkpoint dir, got {root} (not a directory)")
    tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    if not any((tokenizer_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise MissingInputError(f"expected a tokenizer (tokenizer.json) in {tokenizer_dir}, found none")
    facts = _model_facts(root, tokenizer_dir)
    eos, pad = _generation_ids(root, tokenizer_dir)
    checkpoint = root if (root / "config.json").is_file() and any(root.glob("*.safetensors")) else None
    if checkpoint is None and (root / MANIFEST).is_file():
        path = Path(Manifest.read(root).checkpoint.get("path", ""))
        checkpoint = path if path.is_dir() and any(path.glob("*.safetensors")) else None
    enc = root / "encoder"
    io, embeddings_dtype, profile_max = _encoder_facts(enc)
    llm_engine = root / "llm" / "engine"
    if (llm_engine / "config.json").is_file():
        engine_vocab = int(_json(llm_engine / "config.json").get("pretrained_config", {}).get("vocab_size", 0))
        if engine_vocab and engine_vocab != facts["vocab_size"]:
            raise ValueError(f"expected the engine's vocab_size {facts['vocab_size']} (the manifest's "
                             f"engine_vocab_size, where fake ids start), got {engine_vocab} "
                             f"in {llm_engine / 'config.json'}")
    return EngineFacts(
        engine_dir=root, tokenizer_dir=tokenizer_dir, eos_token_ids=eos, pad_id=pad, checkpoint_dir=checkpoint,
        encoder_onnx=enc / "encoder.onnx" if (enc / "encoder.onnx").is_file() else None,
        encoder_plan=enc / "encoder.plan" if (enc / "encoder.plan").is_file() else None,
        encoder_io=io, embeddings_dtype=embeddings_dtype, plan_max_windows=profile_max,
        llm_engine=llm_engine if (llm_engine / "config.json").is_file() else None,
        llm_checkpoint=root / "llm" / "checkpoint" if (root / "llm" / "checkpoint" / "config.json").is_file() else None,
        limits=ServingLimits.from_engine_dir(root), variant=_variant(root), **facts,
    )


def _variant(root: Path) -> dict:
    if not (root / MANIFEST).is_file():
        return {"name": "base"}
    return Manifest.read(root).variant


# ------------------------------------------------------------------------------- model configs


@dataclass(frozen=True)
class RepositoryOptions:
    """How to serve. llm_backend: tensorrtllm (C++ backend on llm/engine) | python (torch decoder);
    encoder_backend: auto | tensorrt | onnxruntime | torch; streaming: decoupled LLM (token streaming);
    instances: count of each python model (and of the encoder plan); server_engine_dir: where the
    server will see the engine dir (e.g. a container mount), default: where it is now."""

    llm_backend: str = "tensorrtllm"
    encoder_backend: str = "auto"
    max_batch_size: int | None = None
    instances: int = 1
    streaming: bool = True
    kv_cache_reuse: bool | None = None  # None: on where the engine has paged context FMHA (engine_rules)
    # share of the GPU memory free once the engine's weights are loaded that the KV cache takes. Triton
    # loads the models side by side: 0.8 leaves a fifth (about 25 GB on an H200 beside the 15 GB bf16
    # engine) to the encoder plan (weights + activations of up to max_windows windows), the python
    # models' CUDA contexts and the CUDA memory pool of the prompt tables. TensorRT-LLM's own default 0.9.
    kv_cache_free_gpu_mem_fraction: float = 0.8
    device: str = "auto"
    max_queue_delay_us: int = 0
    limits: ServingLimits | None = None
    server_engine_dir: str | None = None

    def __post_init__(self):
        if self.llm_backend not in LLM_BACKENDS:
            raise OptionError(f"expected llm_backend in {LLM_BACKENDS}, got {self.llm_backend!r}")
        if self.encoder_backend not in ("auto", "tensorrt", "onnxruntime", "torch"):
            raise OptionError(f"expected encoder_backend in ('auto', 'tensorrt', 'onnxruntime', 'torch'), "
                             f"got {self.encoder_backend!r}")
        for name in ("instances",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise OptionError(f"expected {name} an int >= 1, got {getattr(self, name)!r}")
        if self.max_batch_size is not None and (not isinstance(self.max_batch_size, int) or self.max_batch_size < 1):
            raise OptionError(f"expected max_batch_size None or an int >= 1, got {self.max_batch_size!r}")
        if not 0 < self.kv_cache_free_gpu_mem_fraction < 1:
            raise OptionError(f"expected kv_cache_free_gpu_mem_fraction in (0, 1), got "
                              f"{self.kv_cache_free_gpu_mem_fraction!r}")


@dataclass(frozen=True)
class Plan:
    """Resolved choices: limits in force, encoder backend, the prompt table's Triton dtype (prompt_table's
    output = the LLM's input, `table_dtype_for`), and the path mapper for server paths."""

    facts: EngineFacts
    options: RepositoryOptions
    limits: ServingLimits
    encoder: str
    encoder_windows: int
    table_dtype: str

    def path(self, p: Path) -> str:
        if self.options.server_engine_dir is None:
            return str(p)
        try:
            return str(Path(self.options.server_engine_dir) / p.relative_to(self.facts.engine_dir))
        except ValueError:
            return str(p)


def table_dtype_for(facts: EngineFacts, llm_backend: str) -> str:
    """The prompt table's Triton dtype: the TensorRT-LLM engine's (pretrained_config.dtype of
    llm/engine/config.json; its executor rejects a table of another dtype), FP16 for the python LLM."""
    if llm_backend == "python":
        return "TYPE_FP16"
    path = facts.llm_engine / "config.json"
    dtype = _json(path).get("pretrained_config", {}).get("dtype")
    if dtype not in ENGINE_TABLE_DTYPES:
        raise ValueError(f"expected pretrained_config.dtype in {sorted(ENGINE_TABLE_DTYPES)} in {path} (the prompt "
                         f"table must be in the engine's dtype), got {dtype!r}")
    return ENGINE_TABLE_DTYPES[dtype]


def make_plan(facts: EngineFacts, o: RepositoryOptions) -> Plan:
    limits = o.limits or facts.limits
    if o.max_batch_size is not None:
        if o.llm_backend == "tensorrtllm" and facts.llm_engine is not None and o.max_batch_size > limits.max_batch_size:
            raise OptionError(f"expected max_batch_size <= {limits.max_batch_size} (the engine's), got {o.max_batch_size}")
        limits = dataclasses.replace(limits, max_batch_size=o.max_batch_size)
    if o.llm_backend == "tensorrtllm" and facts.llm_engine is None:
        raise MissingInputError(
            f"expected a TensorRT-LLM engine at {facts.engine_dir / 'llm/engine/config.json'} for llm_backend "
            f"'tensorrtllm', found none: finish `af3trt build` on a machine with TensorRT-LLM, or use llm_backend 'python'")
    if o.llm_backend == "python" and facts.llm_checkpoint is None and facts.checkpoint_dir is None:
        raise MissingInputError(f"expected llm/checkpoint or AF3 weights in {facts.engine_dir} for the python LLM, found none")
    encoder = o.encoder_backend
    if encoder == "auto":
        encoder = ("tensorrt" if facts.encoder_plan and o.llm_backend == "tensorrtllm" else
                   "onnxruntime" if facts.encoder_onnx else "torch")
    needs = {"tensorrt": (facts.encoder_plan, "encoder/encoder.plan"), "onnxruntime": (facts.encoder_onnx,
             "encoder/encoder.onnx"), "torch": (facts.checkpoint_dir, "the AF3 checkpoint's weights")}[encoder]
    if needs[0] is None:
        raise MissingInputError(f"expected {needs[1]} in {facts.engine_dir} for the {encoder} encoder, found none")
    windows = limits.max_windows
    if encoder == "tensorrt":
        windows = facts.plan_max_windows or limits.max_windows
        if windows < limits.max_windows:
            raise OptionError(f"expected the encoder plan's profile to allow {limits.max_windows} windows (one "
                             f"{limits.max_audio_seconds:.0f} s request), got a maximum of {windows}")
    return Plan(facts, o, limits, encoder, windows, table_dtype_for(facts, o.llm_backend))


def _dynamic_batching(delay_us: int, preferred: int | None = None) -> str:
    pref = f"  preferred_batch_size: [ {preferred} ]\n" if preferred else ""
    return f"dynamic_batching {{\n{pref}  max_queue_delay_microseconds: {delay_us}\n}}\n"


def _encoder_tensors(io: EncoderIO, windows: tuple[int, ...], embeddings_dtype: str, hidden: int):
    """features, frames, embeddings; windows () for the encoder (W is its batch axis), (-1,) elsewhere."""
    return (TensorSpec(io.features, NUMPY_TO_TRITON[io.features_dtype], windows + (N_MELS, FRAMES_PER_WINDOW)),
            TensorSpec(io.frames, NUMPY_TO_TRITON[io.frames_dtype], windows + (1,), reshape=None if windows else ()),
            TensorSpec(io.embeddings, embeddings_dtype, windows + (TOKENS_PER_WINDOW, hidden)))


def preprocessing_config(plan: Plan) -> ModelConfig:
    f, o, io = plan.facts, plan.options, plan.facts.encoder_io
    features, frames, _ = _encoder_tensors(io, (-1,), f.embeddings_dtype, f.hidden_size)
    outputs = (features, frames, tensor("rows", "int32", -1)) + tuple(
        from_preprocessing(t) for t in LLM_INPUTS if t.name not in TABLE_INPUTS) + (tensor("warnings", "bytes", -1),)
    params = PreprocessingParams(
        tokenizer_dir=plan.path(f.tokenizer_dir), vocab_size=f.vocab_size, valid_vocab=f.valid_vocab,
        audio_token_id=f.audio_token_id,
        end_id=f.eos_token_ids[0], pad_id=f.pad_id, stop_ids=list(f.eos_token_ids[1:]),
        limits=plan.limits.record(),
        features=io.features, frames=io.frames, features_dtype=io.features_dtype,
        frames_dtype=io.frames_dtype, llm_decoupled=o.streaming)
    return ModelConfig(PREPROCESSING, 'backend: "python"', 0, REQUEST_INPUTS + (RETURNS_WARNINGS,), outputs, o.instances,
                       parameters=param_pairs(params))


def encoder_config(plan: Plan) -> ModelConfig:
    f, o, io = plan.facts, plan.options, plan.facts.encoder_io
    if plan.encoder == "tensorrt":
        features, frames, emb = _encoder_tensors(io, (), f.embeddings_dtype, f.hidden_size)
        if f.embeddings_dtype not in ("TYPE_FP16", "TYPE_FP32"):
            raise ValueError(f"expected the encoder plan's output FP16 or FP32 (python models read it), got {f.embeddings_dtype}")
        return ModelConfig(ENCODER, 'platform: "tensorrt_plan"', plan.encoder_windows, (features, frames), (emb,),
                           o.instances, "KIND_GPU", dynamic_batching=_dynamic_batching(o.max_queue_delay_us))
    features, frames, emb = _encoder_tensors(io, (), "TYPE_FP16", f.hidden_size)
    path = f.engine_dir if plan.encoder == "onnxruntime" else f.checkpoint_dir
    params = EncoderParams(backend=plan.encoder, path=plan.path(path), device=o.device, features=io.features,
                           frames=io.frames, embeddings=io.embeddings)
    return ModelConfig(ENCODER, 'backend: "python"', plan.encoder_windows, (features, frames), (emb,), o.instances,
                       parameters=param_pairs(params))


def _encoder_output_dtype(plan: Plan) -> str:
    return plan.facts.embeddings_dtype if plan.encoder == "tensorrt" else "TYPE_FP16"


def prompt_table_config(plan: Plan) -> ModelConfig:
    io, h = plan.facts.encoder_io, plan.facts.hidden_size
    emb = _encoder_tensors(io, (-1,), _encoder_output_dtype(plan), h)[2]
    outputs = (TensorSpec("prompt_embedding_table", plan.table_dtype, (1, -1, h)),
               tensor("prompt_vocab_size", "int32", 1, 1))
    params = param_pairs(PromptTableParams(hidden_size=h, embeddings=io.embeddings,
                                           dtype=numpy_dtype(plan.table_dtype)))
    if plan.encoder == "tensorrt":
        params += (("FORCE_CPU_ONLY_INPUT_TENSORS", "no"),)  # take the plan's GPU output as is (DLPack)
    return ModelConfig(PROMPT_TABLE, 'backend: "python"', 0, (emb, tensor("rows", "int32", -1)), outputs,
                       plan.options.instances, parameters=params)


def llm_config(plan: Plan) -> ModelConfig:
    f, o, mbs = plan.facts, plan.options, plan.limits.max_batch_size
    inputs = llm_inputs(plan.table_dtype)  # prompt_embedding_table as prompt_table emits it
    if o.llm_backend == "python":
        is_engine_dir = (f.engine_dir / "manifest.json").is_file()  # then llm/checkpoint is required (above)
        params = LLMParams(path=plan.path(f.engine_dir if f.llm_checkpoint or is_engine_dir else f.checkpoint_dir),
                           device=o.device, dtype="auto", audio_token_id=f.audio_token_id)
        return ModelConfig(LLM, 'backend: "python"', mbs, inputs, LLM_OUTPUTS, o.instances,
                           decoupled=o.streaming, parameters=param_pairs(params))
    # Parameter names and values as the tensorrtllm backend (TensorRT-LLM 1.2 triton_backend/
    # inflight_batcher_llm, model_instance_state.cc) reads them. tokenizer_dir, guided_decoding_backend
    # and xgrammar_tokenizer_info_path are read without a default: a config lacking them fails to load;
    # empty values mean no guided decoding.
    reuse = _kv_cache_reuse(f.llm_engine, o.kv_cache_reuse)
    params = (("gpt_model_type", "inflight_fused_batching"), ("gpt_model_path", plan.path(f.llm_engine)),
              ("max_beam_width", "1"), ("batch_scheduler_policy", "guaranteed_no_evict"),
              ("kv_cache_free_gpu_mem_fraction", str(o.kv_cache_free_gpu_mem_fraction)),
              ("enable_kv_cache_reuse", str(reuse).lower()),
              ("exclude_input_in_output", "true"), ("enable_chunked_context", "false"),
              ("tokenizer_dir", ""), ("guided_decoding_backend", ""), ("xgrammar_tokenizer_info_path", ""),
              ("FORCE_CPU_ONLY_INPUT_TENSORS", "no"))
    world = engine_world_size(_json(f.llm_engine / "config.json"))
    if world > 1:  # leader mode under mpirun: rank r drives GPU r (af3trt.serving.launch)
        params += (("gpu_device_ids", ",".join(str(r) for r in range(world))),)
    return ModelConfig(LLM, 'backend: "tensorrtllm"', mbs, inputs, LLM_OUTPUTS, 1, "KIND_CPU",
                       decoupled=o.streaming, dynamic_batching=_dynamic_batching(o.max_queue_delay_us, mbs),
                       parameters=params)


def launch_spec(plan: Plan):
    """How `af3trt serve` launches this repository (af3trt.serving.launch): the C++ LLM's world size
    (tp*pp ranks under mpirun), GPU 0's CUDA memory pool for the largest prompt tables, and the
    TensorRT-LLM release that built the engine (checked before loading)."""

    if plan.options.llm_backend != "tensorrtllm":
        return LaunchSpec()
    f = plan.facts
    table_bytes = int(next(d.bytes for d in DTYPES.values() if d.triton == plan.table_dtype))
    built = None
    if (f.engine_dir / MANIFEST).is_file():
        built = (Manifest.read(f.engine_dir).stages.get("llm_engine") or {}).get("tensorrt_llm")
    return LaunchSpec(world_size=engine_world_size(_json(f.llm_engine / "config.json")),
                      cuda_memory_pool_bytes=pool_bytes(plan.limits.max_audio_tokens, f.hidden_size, table_bytes,
                                                        plan.limits.max_batch_size),
                      tensorrt_llm=built, cpp_llm=True)


def _kv_cache_reuse(llm_engine: Path, requested: bool | None) -> bool:
    """enable_kv_cache_reuse: only on an engine with paged context FMHA (its config.json says)."""
    allowed = kv_reuse_allowed(_json(llm_engine / "config.json"))
    if requested and not allowed:
        raise ValueError(f"expected kv_cache_reuse off or unset for {llm_engine}: its config.json says "
                         f"use_paged_context_fmha false (trtllm-build drops it for an INT8 KV cache, or an FP8 KV "
                         f"cache without FP8 weights/SM89), and KV-cache reuse needs it; got kv_cache_reuse=True")
    return allowed if requested is None else bool(requested)


def postprocessing_config(plan: Plan) -> ModelConfig:
    inputs = (tensor("output_ids", "int32", -1, -1, -1), tensor("sequence_length", "int32", -1, -1),
              tensor("STRIP_PREFIX", "bool", 1, optional=True))
    params = PostprocessingParams(tokenizer_dir=plan.path(plan.facts.tokenizer_dir))
    return ModelConfig(POSTPROCESSING, 'backend: "python"', 0, inputs, REQUEST_OUTPUTS, plan.options.instances,
                       parameters=param_pairs(params))


def bls_config(plan: Plan) -> ModelConfig:
    io = plan.facts.encoder_io
    params = BLSParams(
        tokenizer_dir=plan.path(plan.facts.tokenizer_dir), preprocessing_inputs=[t.name for t in REQUEST_INPUTS],
        llm_inputs=[t.name for t in LLM_INPUTS if t.name not in TABLE_INPUTS], encoder_inputs=[io.features, io.frames],
        embeddings=io.embeddings, llm_decoupled=plan.options.streaming, workers=2 * plan.limits.max_batch_size)
    return ModelConfig(BLS, 'backend: "python"', 0, REQUEST_INPUTS, BLS_OUTPUTS, 1, decoupled=True,
                       parameters=param_pairs(params))


def ensemble_steps(plan: Plan) -> list[Step]:
    io = plan.facts.encoder_io
    llm_from_prep = [t.name for t in LLM_INPUTS if t.name not in TABLE_INPUTS]
    prep_out = [io.features, io.frames, "rows", *llm_from_prep]
    return [
        Step(PREPROCESSING, tuple((t.name, t.name) for t in ensemble_inputs(plan)),
             tuple((n, f"_{n}") for n in prep_out) + ((("warnings", "WARNINGS"),) if not plan.options.streaming else ())),
        Step(ENCODER, ((io.features, f"_{io.features}"), (io.frames, f"_{io.frames}")),
             ((io.embeddings, f"_{io.embeddings}"),)),
        Step(PROMPT_TABLE, ((io.embeddings, f"_{io.embeddings}"), ("rows", "_rows")),
             tuple((n, f"_{n}") for n in TABLE_INPUTS)),
        Step(LLM, tuple((t.name, f"_{t.name}") for t in LLM_INPUTS), tuple((t.name, f"_{t.name}") for t in LLM_OUTPUTS)),
        Step(POSTPROCESSING, (("output_ids", "_output_ids"), ("sequence_length", "_sequence_length"))
             + ((("STRIP_PREFIX", "STRIP_PREFIX"),) if not plan.options.streaming else ()), (("TEXT", "TEXT"),)),
    ]


def ensemble_outputs(plan: Plan) -> tuple[TensorSpec, ...]:
    """TEXT, and WARNINGS unless the ensemble is decoupled (triton_spec.ENSEMBLE_OUTPUTS says why)."""
    return REQUEST_OUTPUTS if plan.options.streaming else ENSEMBLE_OUTPUTS


def ensemble_inputs(plan: Plan) -> tuple[TensorSpec, ...]:
    """The request inputs but `af3`'s own (BLS_ONLY_INPUTS: STOP strings, which Triton then refuses by
    name); a streaming ensemble has no STRIP_PREFIX: Triton refuses a step fed by both a decoupled model
    (the LLM) and the request, and streamed pieces cannot be stripped (use `af3`)."""
    return tuple(t for t in REQUEST_INPUTS if t.name not in BLS_ONLY_INPUTS
                 and not (plan.options.streaming and t.name == "STRIP_PREFIX"))


# ------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Repository:
    """A written model repository: where, which models, the limits it enforces, how it was asked for."""

    path: Path
    models: tuple[str, ...]
    limits: ServingLimits
    options: RepositoryOptions
    encoder: str = field(default="")


def render_repository(plan: Plan) -> dict[str, str]:
    """{model name: config.pbtxt text} for every model of the repository."""
    configs = [preprocessing_config(plan), encoder_config(plan), prompt_table_config(plan), llm_config(plan),
               postprocessing_config(plan), bls_config(plan)]
    meta = variant_pairs(plan.facts.variant) + version_pairs()  # on af3trt's python models and the ensemble
    configs = [dataclasses.replace(c, parameters=c.parameters + meta) if c.backend == 'backend: "python"' else c
               for c in configs]
    out = {c.name: render_model(c) for c in configs}
    out[ENSEMBLE] = render_ensemble(ENSEMBLE, ensemble_inputs(plan), ensemble_outputs(plan), ensemble_steps(plan), meta)
    return out


def _model_files(plan: Plan, name: str, version_dir: Path) -> None:
    version_dir.mkdir(parents=True)
    if name == ENCODER and plan.encoder == "tensorrt":
        (version_dir / "model.plan").symlink_to(plan.path(plan.facts.encoder_plan))
    elif name == ENSEMBLE or (name == LLM and plan.options.llm_backend == "tensorrtllm"):
        (version_dir / ".gitkeep").write_text("")
    else:
        (version_dir / "model.py").write_text((TEMPLATES / name / "model.py").read_text())


def write_repository(engine_dir: str | os.PathLike, out_dir: str | os.PathLike, *, llm_backend: str = "tensorrtllm",
                     max_batch_size: int | None = None, instances: int = 1, streaming: bool = True,
                     **options) -> Repository:
    """Write the Triton model repository for `engine_dir` (an af3trt engine dir, or an AF3 checkpoint
    dir for the python backends) into `out_dir`, atomically. Other keywords: `RepositoryOptions`.

    An existing `out_dir` is replaced only if an earlier `write_repository` made it (or it is empty).
    """
    o = RepositoryOptions(llm_backend=llm_backend, max_batch_size=max_batch_size, instances=instances,
                          streaming=streaming, **options)
    plan = make_plan(inspect_engine_dir(engine_dir), o)
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ExistingOutputError(f"expected {out} empty or an af3trt model repository ({MARKER}), got other files; "
                              f"not replacing it")
    configs = render_repository(plan)
    with staged_dir(out) as tmp:
        for name, text in configs.items():
            (tmp / name).mkdir()
            (tmp / name / "config.pbtxt").write_text(text)
            _model_files(plan, name, tmp / name / "1")
        record = {"af3trt": __version__, "engine_dir": str(plan.facts.engine_dir), "limits": plan.limits.record(),
                  "launch": launch_spec(plan).record(),
                  "encoder": plan.encoder, "options": {k: v for k, v in dataclasses.asdict(o).items() if k != "limits"},
                  "variant": plan.facts.variant}
        (tmp / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    return Repository(out, tuple(sorted(configs)), plan.limits, o, plan.encoder)
