"""`af3trt build`: AF3 checkpoint -> engine directory (DESIGN §3), one stage after another.

Stages: tokenizer (tokenizer, chat template, processor and model configs) -> encoder_onnx ->
encoder_plan (TensorRT) -> llm_checkpoint (TensorRT-LLM checkpoint via ModelOpt) -> llm_engine
(trtllm-build). Each stage writes into a temporary folder and is renamed into place when complete;
a stage whose key (checkpoint fingerprint + flags) is unchanged is skipped. Where tensorrt or
tensorrt_llm is missing, the stages before still complete and the manifest records the exact
command that finishes the build on a machine that has them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import fileio
from ..errors import ExistingOutputError, OptionError
from ..formats.manifest import Manifest, ManifestError, output_problems, output_record, stage_key
from ..fileio import clean_partials, staged_dir
from .stage_log import stage_output

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "generation_config.json", "config.json", "added_tokens.json")
ENCODER_PLAN_PRECISIONS = ("fp16", "bf16", "fp8", "int8")
ENCODER_INPUTS = ("features", "audio")  # af3trt.runtime.encoder.INPUT_KINDS (not imported: torch-free module)
STAGE_NAMES = ("encoder", "llm")


@dataclass(frozen=True)
class BuildOptions:
    """What `af3trt build` is asked for. limits: `af3trt.build.llm.EngineLimits`. encoder_input: what
    the encoder graph takes, "features" (log-mel windows) or "audio" (padded 16 kHz windows; the graph
    computes the log-mel with a conv STFT; float plans only)."""

    precision: str = "bf16"
    kv_cache: str = "auto"
    tp_size: int = 1
    encoder_precision: str = "fp16"
    encoder_input: str = "features"
    limits: object = None
    calib_audio: str | None = None
    calib_size: int = 16
    calib_max_tokens: int = 1024
    stages: tuple[str, ...] = STAGE_NAMES
    force: bool = False
    variant: str = "base"  # af3trt.think.VARIANTS: "think" builds the checkpoint's AF3-Think weights
    target_sm: int | None = None  # the GPU the engine is for when none is present (default 90); see engine_rules

    def __post_init__(self):
        from ..think import check_variant
        from .llm import EngineLimits
        from ..formats.precision import get_kv_cache, get_precision

        check_variant(self.variant)
        get_precision(self.precision)
        get_kv_cache(self.kv_cache)
        if self.encoder_precision not in ENCODER_PLAN_PRECISIONS:
            raise OptionError(f"expected encoder precision in {ENCODER_PLAN_PRECISIONS}, got {self.encoder_precision!r}")
        if self.encoder_input not in ENCODER_INPUTS:
            raise OptionError(f"expected encoder input in {ENCODER_INPUTS}, got {self.encoder_input!r}")
        if self.encoder_input == "audio" and self.encoder_precision in ("fp8", "int8"):
            raise OptionError(f"expected encoder precision fp16 or bf16 with encoder input 'audio' (Q/DQ calibration "
                             f"feeds log-mel windows), got {self.encoder_precision!r}")
        unknown = set(self.stages) - set(STAGE_NAMES)
        if unknown or not self.stages:
            raise OptionError(f"expected stages from {STAGE_NAMES}, got {self.stages!r}")
        if self.limits is None:
            object.__setattr__(self, "limits", EngineLimits())
        for name in ("calib_size", "calib_max_tokens", "tp_size"):
            if getattr(self, name) < 1:
                raise OptionError(f"expected {name} >= 1, got {getattr(self, name)}")


def check_options(options: BuildOptions, spec) -> None:
    """What can be checked before any stage runs, against the checkpoint's ModelSpec: tensor-parallel
    size (and INT4 AWQ group widths), the calibration folder. A bad option fails here, in seconds."""
    from .calibration import audio_files
    from .llm import _check_tp
    from ..formats.precision import get_precision

    if "llm" in options.stages:
        _check_tp(spec.text, get_precision(options.precision), options.tp_size)
    if options.calib_audio is not None:
        audio_files(options.calib_audio)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def limits_record(limits) -> dict:
    """manifest.json `limits`: the EngineLimits and what they derive. max_audio_tokens = prompt-table
    rows per request (max_prompt_embedding_table_size // max_batch_size); max_windows = encoder
    windows one call may hold (the plan's profile maximum)."""
    return {**asdict(limits), "max_audio_tokens": limits.audio_tokens_per_request,
            "max_windows": _windows_profile(limits)[2], "max_input_len": limits.max_input_len,
            "max_seq_len": limits.max_seq_len, "max_prompt_embedding_table_size": limits.prompt_table_size,
            "max_num_tokens": limits.num_tokens}


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="af3trt build", unit="stage", file=sys.stderr)
    except ImportError:  # tqdm is a base dependency; keep building without a bar all the same
        return None


def build_engine_dir(*, model: str | Path, out: str | Path, options: BuildOptions = BuildOptions(),
                     summary: dict | None = None) -> Manifest:
    """Build (or complete) the engine dir `out` from the AF3 checkpoint `model` (its think/ weights for
    variant "think": every stage, calibration included, runs on them). Returns the manifest.
    `summary` (a dict), when given, receives {stage: what this run did}: "built" (new), "rebuilt: WHY"
    (an earlier build of it was there: changed flags or checkpoint, damaged outputs, --force),
    "unchanged, skipped", or "left for a machine that has MODULE" (tensorrt / tensorrt_llm missing)."""
    from ..think import open_checkpoint

    ckpt = open_checkpoint(model, options.variant)
    check_options(options, ckpt.spec)
    out = Path(out)
    _check_same_variant(out, options)
    out.mkdir(parents=True, exist_ok=True)
    clean_partials(out)
    plugins = None
    if "llm" in options.stages:  # refuse what trtllm-build refuses before anything (calibration) runs
        from .engine_rules import check_build, target_gpu

        target = target_gpu(options.target_sm)
        plugins = (target, check_build(options.precision, options.kv_cache, target))
    fingerprint = ckpt.fingerprint()  # a think checkpoint's covers its think/ files: every stage key does
    earlier = _earlier_stages(out, fingerprint)
    manifest = _start_manifest(out, ckpt, fingerprint, options)
    manifest.variant = _variant_record(ckpt)
    if plugins is not None:  # what trtllm-build will make of the flags on that GPU (the engine's own, once built)
        manifest.precision.update(target_gpu=plugins[0].record(), engine_plugins=plugins[1].record())
    plan = [("tokenizer", _stage_tokenizer)]
    if "encoder" in options.stages:
        plan += [("encoder_onnx", _stage_encoder_onnx), ("encoder_plan", _stage_encoder_plan)]
    if "llm" in options.stages:
        plan += [("llm_checkpoint", _stage_llm_checkpoint), ("llm_engine", _stage_llm_engine)]
    bar = _progress(len(plan))
    try:
        for name, run in plan:
            key = _key(name, fingerprint, options, manifest.stages)
            entry = manifest.stages.pop(name, None)  # re-inserted below: the manifest lists stages in build order
            problems = None
            if not options.force and entry and entry.get("key") == key and "missing" not in entry:
                problems = output_problems(out, entry)  # present and intact: sizes and full hashes
                if problems:
                    log.warning("stage %s is not what was built (%s): rebuilding it", name, "; ".join(problems[:3]))
            if problems == []:
                log.info("stage %s unchanged: skipped", name)
                manifest.stages[name] = entry
                if summary is not None:
                    summary[name] = "unchanged, skipped"
            else:  # a damaged stage is redone from scratch: the stage functions skip nothing of their own
                stage_options = dataclasses.replace(options, force=True) if problems else options
                if bar is not None:
                    bar.clear()  # the stage's progress lines take the bar's line until it is redrawn below
                with stage_output(out / "logs" / f"{name}.log"):  # third-party chatter off the terminal
                    record = run(ckpt, out, stage_options, manifest)
                entry = {"key": key, "checkpoint": fingerprint, **record}
                if "missing" not in entry:
                    entry["outputs"] = output_record(out, _output_paths(name, entry))
                manifest.stages[name] = entry
                manifest.write(out)
                if summary is not None:
                    summary[name] = _outcome(record, earlier.get(name), problems, options.force)
            if bar is not None:
                bar.set_postfix_str(name)
                bar.update()
    finally:  # also on Ctrl-C: the bar's last line comes before the CLI's "interrupted"
        if bar is not None:
            bar.close()
    manifest.write(out)
    return manifest


def _earlier_stages(out: Path, fingerprint: str) -> dict[str, str]:
    """{stage: why a new build of it is a rebuild} for the stages an earlier build completed in `out`."""
    try:
        old = Manifest.read(out)
    except ManifestError:
        return {}
    same = old.checkpoint.get("fingerprint") == fingerprint
    why = "its flags or inputs changed" if same else "the checkpoint changed"
    return {name: why for name, entry in old.stages.items() if "missing" not in entry}


def _outcome(record: dict, earlier: str | None, problems: list[str] | None, force: bool) -> str:
    """The build summary's word for a stage that ran (see build_engine_dir's `summary`)."""
    if "missing" in record:
        return f"left for a machine that has {record['needs']}"
    if earlier is None:
        return "built"
    if problems:
        return f"rebuilt: its outputs were damaged ({problems[0]})"
    return "rebuilt: --force" if force else f"rebuilt: {earlier}"


def _start_manifest(out: Path, ckpt, fingerprint: str, options: BuildOptions) -> Manifest:
    record = {"checkpoint": {"path": str(ckpt.path.resolve()), "fingerprint": fingerprint},
              "model": {"vocab_size": ckpt.spec.text.vocab_size, "hidden_size": ckpt.spec.text.hidden_size,
                        "audio_token_id": ckpt.spec.audio_token_id, "num_layers": ckpt.spec.text.num_layers},
              "limits": limits_record(options.limits),
              "precision": {"llm": options.precision, "kv_cache": options.kv_cache, "tp_size": options.tp_size,
                            "encoder_plan": options.encoder_precision}}
    try:
        old = Manifest.read(out)
    except ManifestError:
        old = None
    manifest = Manifest(**record)
    if old is not None and old.checkpoint.get("fingerprint") == fingerprint:
        for name, entry in old.stages.items():  # keep what still matches these options, drop the rest
            if entry.get("key") == _key(name, fingerprint, options, old.stages):
                manifest.stages[name] = entry
            elif "missing" not in entry:
                _remove(out / entry["path"])
    return manifest


def _check_same_variant(out: Path, options: BuildOptions) -> None:
    """Each variant is an engine dir of its own: building another one over it needs `force`."""
    try:
        built = Manifest.read(out).variant.get("name", "base")
    except ManifestError:
        return
    if built != options.variant and not options.force:
        raise ExistingOutputError(f"expected an engine dir of variant {options.variant!r} (or a new one) at {out}, got "
                              f"one of variant {built!r}: build the {options.variant} model into another --out, or "
                              f"pass --force to replace it")


def _variant_record(ckpt) -> dict:
    """manifest.variant: {"name": "base"}, or the think adapter's hash, suffix and what it changed."""
    from ..think import variant_record

    record = variant_record(ckpt)
    if record["name"] != "base":
        log.info("variant %s: adapter %s, %d LoRA modules merged, %d non-LoRA tensors applied",
                 record["name"], record["adapter"], record["lora_modules"], record["non_lora"]["applied"])
    return record


UPSTREAM = {"encoder_plan": "encoder_onnx", "llm_engine": "llm_checkpoint"}  # a stage built from another's outputs


def _key(name: str, fingerprint: str, options: BuildOptions, stages: dict) -> str:
    """A stage's key: what it reads. The checkpoint fingerprint covers every file of the checkpoint
    (weights, tokenizer, templates, think/); its flags; the recorded outputs of the stage it is built
    from (a rebuilt ONNX graph or TRT-LLM checkpoint means a new plan or engine)."""
    up = stages.get(UPSTREAM.get(name, ""), {}).get("outputs")
    return stage_key(stage=name, checkpoint=fingerprint, options=_stage_flags(name, options),
                     upstream=stage_key(outputs=up) if up else None)


def _output_paths(name: str, entry: dict) -> list[str]:
    """Files and folders a stage writes (relative to the engine dir), recorded and verified."""
    paths = [entry["path"]]
    if name == "encoder_onnx" and entry.get("external_data"):
        from ..runtime.encoder import ONNX_DATA_FILE

        paths.append(str(Path(entry["path"]).parent / ONNX_DATA_FILE))
    if entry.get("qdq_onnx"):
        paths.append(entry["qdq_onnx"])
    return paths


def gpu_identity() -> dict | None:
    """The GPU a build targets, in stage keys of GPU-specific artifacts (TensorRT plan, TRT-LLM engine):
    name and compute capability of device 0; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _stage_flags(name: str, o: BuildOptions) -> dict:
    if name == "encoder_onnx":
        return {"max_windows": _plan_profile(o)[2], "inputs": o.encoder_input}
    if name == "encoder_plan":
        return {"precision": o.encoder_precision, "limits": asdict(o.limits), "inputs": o.encoder_input,
                "gpu": gpu_identity()}
    if name == "llm_checkpoint":
        return {"precision": o.precision, "kv_cache": o.kv_cache, "tp": o.tp_size, "calib_audio": o.calib_audio,
                "calib_size": o.calib_size, "calib_max_tokens": o.calib_max_tokens}
    if name == "llm_engine":
        return {"precision": o.precision, "kv_cache": o.kv_cache, "tp": o.tp_size, "limits": asdict(o.limits),
                "gpu": gpu_identity()}
    return {}


def _stage_tokenizer(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    with staged_dir(out / "tokenizer") as tmp:
        copied = [n for n in TOKENIZER_FILES if (ckpt.path / n).is_file()]
        for name in copied:
            shutil.copyfile(ckpt.path / name, tmp / name)
    return {"path": "tokenizer", "files": copied}


def _stage_encoder_onnx(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    from .encoder import export_onnx

    res = export_onnx(checkpoint=ckpt, out_dir=out / "encoder", dtype="fp32",
                      max_windows=_plan_profile(options)[2], force=options.force, inputs=options.encoder_input)
    return {"path": str(res.onnx_path.relative_to(out)), "dtype": res.dtype, "external_data": res.external_data,
            "max_rel_error": res.max_rel_error, "inputs": options.encoder_input}


def _plan_profile(options: BuildOptions) -> tuple[int, int, int]:
    """(min, opt, max) encoder windows: up to 20 windows (10 min) for each of max_batch_size requests."""
    return _windows_profile(options.limits)


def _windows_profile(limits) -> tuple[int, int, int]:
    from ..spec import MAX_WINDOWS, WINDOW_SECONDS

    per_request = min(MAX_WINDOWS, -(-int(limits.max_audio_seconds) // WINDOW_SECONDS))
    hi = max(1, per_request * limits.max_batch_size)
    return 1, min(hi, per_request), hi


def _stage_encoder_plan(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    from .encoder_plan import plan_command

    onnx_path = out / manifest.stages["encoder_onnx"]["path"]
    entry: dict = {"path": "encoder/encoder.plan", "precision": options.encoder_precision}
    if options.encoder_precision in ("int8", "fp8"):  # ModelOpt Q/DQ graph first: runs on CPU too
        from .encoder_quant import quantize_onnx

        q = quantize_onnx(onnx_path, precision=options.encoder_precision, calibration=options.calib_audio)
        onnx_path = q.onnx_path
        entry.update(qdq_onnx=str(onnx_path.relative_to(out)), qdq_cosine_min=q.cosine_min)
    profile = _plan_profile(options)
    if not has_module("tensorrt"):
        return {**entry, "missing": "tensorrt is not installed here", "needs": "TensorRT",
                "command": rebuild_command(ckpt.path, out, options),
                "manual": plan_command(onnx_path.relative_to(out), "encoder", options.encoder_precision, profile)}
    from .encoder_plan import build_plan

    plan = build_plan(onnx_path, out / "encoder", precision=options.encoder_precision, profile=profile,
                      timing_cache=out / "encoder" / "timing.cache", force=options.force)
    return {**entry, "path": str(plan.plan_path.relative_to(out)), "profile": list(plan.profile),
            "tensorrt": plan.tensorrt_version}


def rebuild_command(model: Path, out: Path, o: BuildOptions) -> str:
    """The `af3trt build` line that completes this engine dir on a machine with TensorRT / TensorRT-LLM,
    run from inside the engine dir (`--out .`: the dir can be copied there first; finished stages are
    skipped, the manifest records the new ones). The tiny model is named `tiny`, not its cache path."""
    from ..tiny import default_tiny_dir

    lim = o.limits
    name = "tiny" if Path(model).resolve() == default_tiny_dir().resolve() else str(model)
    argv = ["af3trt", "build", "--model", name, "--out", ".", "--precision", o.precision,
            "--kv-cache", o.kv_cache, "--tp-size", str(o.tp_size), "--encoder-precision", o.encoder_precision,
            "--encoder-input", o.encoder_input,
            "--max-batch-size", str(lim.max_batch_size), "--max-audio-seconds", str(lim.max_audio_seconds),
            "--max-text-tokens", str(lim.max_text_tokens), "--max-new-tokens", str(lim.max_new_tokens),
            "--calib-size", str(o.calib_size), "--calib-max-tokens", str(o.calib_max_tokens),
            "--stages", ",".join(o.stages)]
    if o.variant != "base":
        argv += ["--variant", o.variant]
    if o.calib_audio:
        argv += ["--calib-audio", str(o.calib_audio)]
    if o.target_sm is not None:  # on the machine that finishes the build, its GPU decides
        argv += ["--target-sm", str(o.target_sm)]
    return shlex.join(argv)


def _stage_llm_checkpoint(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    from .calibration import llm_calibration_batches
    from .llm import export_checkpoint
    from ..formats.precision import get_kv_cache, get_precision, needs_calibration

    batches = None
    if needs_calibration(get_precision(options.precision), get_kv_cache(options.kv_cache)):
        batches = llm_calibration_batches(ckpt.path, audio_dir=options.calib_audio, count=options.calib_size,
                                          max_tokens=options.calib_max_tokens, variant=options.variant)
    path = export_checkpoint(checkpoint_dir=ckpt, out_dir=out / "llm" / "checkpoint", precision=options.precision,
                             kv_cache=options.kv_cache, tp_size=options.tp_size, calib_batches=batches)
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])  # padded for int4_awq
    return {"path": "llm/checkpoint", "precision": options.precision, "kv_cache": options.kv_cache,
            "tp_size": options.tp_size, "vocab_size": vocab, "calibration": None if batches is None else
            {"audio_dir": options.calib_audio, "count": options.calib_size, "max_tokens": options.calib_max_tokens}}


def _stage_llm_engine(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    from .llm import trtllm_build_command

    argv = trtllm_build_command(out / "llm" / "checkpoint", out / "llm" / "engine", options.limits,
                                options.precision, options.kv_cache)
    script = out / "llm" / "build_engine.sh"
    portable = trtllm_build_command("checkpoint", "engine", options.limits, options.precision, options.kv_cache)
    script.write_text("#!/usr/bin/env bash\n# trtllm-build for this engine dir (TensorRT-LLM 1.2); paths relative to "
                      "llm/, so the engine dir can be copied and finished elsewhere\nset -euo pipefail\n"
                      'cd "$(dirname "$0")"\n' + shlex.join(portable) + "\n")
    fileio.like_umask(script, executable=True)
    if not has_module("tensorrt_llm"):
        return {"path": "llm/engine", "missing": "tensorrt_llm is not installed here", "needs": "TensorRT-LLM",
                "command": rebuild_command(ckpt.path, out, options), "manual": "bash llm/build_engine.sh", "argv": argv}
    from .stage_log import run_streamed

    with staged_dir(out / "llm" / "engine") as tmp:
        run_argv = list(argv)
        run_argv[run_argv.index("--output_dir") + 1] = str(tmp)
        run_streamed(run_argv, "llm_engine: trtllm-build")  # lines to logs/llm_engine.log, the latest on screen
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"trtllm-build finished without writing config.json in {tmp}")
    from importlib import metadata

    from ..formats.trtllm_engine import engine_plugins

    config = json.loads((out / "llm" / "engine" / "config.json").read_text())
    return {"path": "llm/engine", "argv": argv, "tensorrt_llm": metadata.version("tensorrt_llm"),
            "plugin_config": engine_plugins(config)}  # effective, read back: trtllm-build may drop some
