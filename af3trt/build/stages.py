"""The stages of `af3trt build`, one record each: name, the `--stages` group that selects it, the stage
whose outputs enter its key, the optional module it needs, its key flags, what it runs, the files it
writes, and the `af3trt build` line that finishes it elsewhere. engine_dir runs them in this order.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from .. import fileio
from ..fileio import staged_dir
from ..formats.encoder_io import ENCODER_DIR, ONNX_DATA_FILE, PLAN_FILE
from ..formats.manifest import STAGE_NAMES, Manifest
from ..spec import MAX_WINDOWS, WINDOW_SECONDS
from ..tiny import default_tiny_dir
from . import calibration
from ..formats.trtllm_engine import engine_plugins
from .llm import export_checkpoint, trtllm_build_command
from ..formats.precision import get_kv_cache, get_precision, needs_calibration
from .stage_log import run_streamed

if TYPE_CHECKING:
    from .engine_dir import BuildOptions

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "generation_config.json", "config.json", "added_tokens.json")


@dataclass(frozen=True)
class Stage:
    """One stage of the engine dir. flags(options): what enters its key besides the checkpoint and the
    upstream's recorded outputs (plus the GPU's identity where `gpu`: a plan or an engine is built for
    one GPU). run(ckpt, out, options, manifest) -> the record's facts (`path` included). outputs(record):
    the files and folders recorded and verified. requires / needs: the optional module it runs with
    and its name in words; without it the stage records `missing_record`."""

    name: str
    group: str | None
    run: Callable
    flags: Callable = lambda o: {}
    upstream: str | None = None
    requires: str | None = None
    needs: str | None = None
    gpu: bool = False
    outputs: Callable = lambda record: [record["path"]]

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def missing_record(self, model: Path, out: Path, options: BuildOptions, manual: str) -> dict:
        """The facts of a stage left for a machine that has `requires`."""
        return {"missing": f"{self.requires} is not installed here", "needs": self.needs,
                "command": rebuild_command(model, out, options), "manual": manual}


# -- the flags a stage's key reads -----------------------------------------------------------------------

def plan_profile(options: BuildOptions) -> tuple[int, int, int]:
    """(min, opt, max) encoder windows: up to 20 windows (10 min) for each of max_batch_size requests."""
    return windows_profile(options.limits)


def windows_profile(limits) -> tuple[int, int, int]:
    per_request = min(MAX_WINDOWS, -(-int(limits.max_audio_seconds) // WINDOW_SECONDS))
    hi = max(1, per_request * limits.max_batch_size)
    return 1, min(hi, per_request), hi


def _encoder_onnx_flags(o: BuildOptions) -> dict:
    return {"max_windows": plan_profile(o)[2], "inputs": o.encoder_input}


def _encoder_plan_flags(o: BuildOptions) -> dict:
    return {"precision": o.encoder_precision, "limits": asdict(o.limits), "inputs": o.encoder_input}


def _llm_checkpoint_flags(o: BuildOptions) -> dict:
    return {"precision": o.precision, "kv_cache": o.kv_cache, "tp": o.tp_size, "calib_audio": o.calib_audio,
            "calib_size": o.calib_size, "calib_max_tokens": o.calib_max_tokens}


def _llm_engine_flags(o: BuildOptions) -> dict:
    return {"precision": o.precision, "kv_cache": o.kv_cache, "tp": o.tp_size, "limits": asdict(o.limits)}


def _encoder_onnx_outputs(record) -> list[str]:
    paths = [record["path"]]
    if record.get("external_data"):
        paths.append(str(Path(record["path"]).parent / ONNX_DATA_FILE))
    return paths


def _encoder_plan_outputs(record) -> list[str]:
    return [record["path"], *([record["qdq_onnx"]] if record.get("qdq_onnx") else [])]


# -- what each stage runs -------------------------------------------------------------------------------

def _run_tokenizer(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    with staged_dir(out / "tokenizer") as tmp:
        copied = [n for n in TOKENIZER_FILES if (ckpt.path / n).is_file()]
        for name in copied:
            shutil.copyfile(ckpt.path / name, tmp / name)
    return {"path": "tokenizer", "files": copied}


def _run_encoder_onnx(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    from .encoder import export_onnx  # torch

    res = export_onnx(checkpoint=ckpt, out_dir=out / ENCODER_DIR, dtype="fp32",
                      max_windows=plan_profile(options)[2], force=options.force, inputs=options.encoder_input)
    return {"path": str(res.onnx_path.relative_to(out)), "dtype": res.dtype, "external_data": res.external_data,
            "max_rel_error": res.max_rel_error, "inputs": options.encoder_input}


def _run_encoder_plan(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    from .encoder_plan import build_plan, plan_command  # torch
    from .encoder_quant import quantize_onnx

    onnx_path = out / manifest.stages["encoder_onnx"]["path"]
    entry: dict = {"path": f"{ENCODER_DIR}/{PLAN_FILE}", "precision": options.encoder_precision}
    if options.encoder_precision in ("int8", "fp8"):  # ModelOpt Q/DQ graph first: runs on CPU too
        q = quantize_onnx(onnx_path, precision=options.encoder_precision, calibration=options.calib_audio)
        onnx_path = q.onnx_path
        entry.update(qdq_onnx=str(onnx_path.relative_to(out)), qdq_cosine_min=q.cosine_min)
    profile = plan_profile(options)
    stage = STAGES["encoder_plan"]
    if not stage.available():
        manual = plan_command(onnx_path.relative_to(out), ENCODER_DIR, options.encoder_precision, profile)
        return {**entry, **stage.missing_record(ckpt.path, out, options, manual)}
    plan = build_plan(onnx_path, out / ENCODER_DIR, precision=options.encoder_precision, profile=profile,
                      timing_cache=out / ENCODER_DIR / "timing.cache", force=options.force)
    return {**entry, "path": str(plan.plan_path.relative_to(out)), "profile": list(plan.profile),
            "tensorrt": plan.tensorrt_version}


def _run_llm_checkpoint(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    batches = None
    if needs_calibration(get_precision(options.precision), get_kv_cache(options.kv_cache)):
        batches = calibration.llm_calibration_batches(ckpt.path, audio_dir=options.calib_audio,
                                                      count=options.calib_size, max_tokens=options.calib_max_tokens,
                                                      variant=options.variant)
    path = export_checkpoint(checkpoint_dir=ckpt, out_dir=out / "llm" / "checkpoint", precision=options.precision,
                             kv_cache=options.kv_cache, tp_size=options.tp_size, calib_batches=batches)
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])  # padded for int4_awq
    return {"path": "llm/checkpoint", "precision": options.precision, "kv_cache": options.kv_cache,
            "tp_size": options.tp_size, "vocab_size": vocab, "calibration": None if batches is None else
            {"audio_dir": options.calib_audio, "count": options.calib_size, "max_tokens": options.calib_max_tokens}}


def _run_llm_engine(ckpt, out: Path, options: BuildOptions, manifest: Manifest) -> dict:
    argv = trtllm_build_command(out / "llm" / "checkpoint", out / "llm" / "engine", options.limits,
                                options.precision, options.kv_cache)
    script = out / "llm" / "build_engine.sh"
    portable = trtllm_build_command("checkpoint", "engine", options.limits, options.precision, options.kv_cache)
    script.write_text("#!/usr/bin/env bash\n# trtllm-build for this engine dir (TensorRT-LLM 1.2); paths relative to "
                      "llm/, so the engine dir can be copied and finished elsewhere\nset -euo pipefail\n"
                      'cd "$(dirname "$0")"\n' + shlex.join(portable) + "\n")
    fileio.like_umask(script, executable=True)
    stage = STAGES["llm_engine"]
    if not stage.available():
        return {"path": "llm/engine", **stage.missing_record(ckpt.path, out, options, "bash llm/build_engine.sh"),
                "argv": argv}
    with staged_dir(out / "llm" / "engine") as tmp:
        run_argv = list(argv)
        run_argv[run_argv.index("--output_dir") + 1] = str(tmp)
        run_streamed(run_argv, "llm_engine: trtllm-build")  # lines to logs/llm_engine.log, the latest on screen
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"trtllm-build finished without writing config.json in {tmp}")
    config = json.loads((out / "llm" / "engine" / "config.json").read_text())
    return {"path": "llm/engine", "argv": argv, "tensorrt_llm": metadata.version("tensorrt_llm"),
            "plugin_config": engine_plugins(config)}  # effective, read back: trtllm-build may drop some


STAGES: MappingProxyType[str, Stage] = MappingProxyType({s.name: s for s in (
    Stage("tokenizer", None, _run_tokenizer),
    Stage("encoder_onnx", "encoder", _run_encoder_onnx, _encoder_onnx_flags, outputs=_encoder_onnx_outputs),
    Stage("encoder_plan", "encoder", _run_encoder_plan, _encoder_plan_flags, upstream="encoder_onnx",
          requires="tensorrt", needs="TensorRT", gpu=True, outputs=_encoder_plan_outputs),
    Stage("llm_checkpoint", "llm", _run_llm_checkpoint, _llm_checkpoint_flags),
    Stage("llm_engine", "llm", _run_llm_engine, _llm_engine_flags, upstream="llm_checkpoint",
          requires="tensorrt_llm", needs="TensorRT-LLM", gpu=True),
)})
assert tuple(STAGES) == STAGE_NAMES
GROUPS = tuple(dict.fromkeys(s.group for s in STAGES.values() if s.group))  # the values of --stages


def selected(options: BuildOptions) -> list[Stage]:
    """The stages `options.stages` asks for, in build order (the tokenizer always)."""
    return [s for s in STAGES.values() if s.group is None or s.group in options.stages]


# -- the `af3trt build` line that finishes an engine dir elsewhere -----------------------------------

@dataclass(frozen=True)
class BuildFlag:
    """One `af3trt build` option of the finishing command: `field` of BuildOptions ("limits.NAME" for
    an EngineLimits field); `optional`: left out when unset or at its default."""

    field: str
    option: str
    optional: bool = False

    def value(self, options: BuildOptions):
        obj, name = (options.limits, self.field[7:]) if self.field.startswith("limits.") else (options, self.field)
        return getattr(obj, name)


BUILD_FLAGS = (
    BuildFlag("precision", "--precision"), BuildFlag("kv_cache", "--kv-cache"), BuildFlag("tp_size", "--tp-size"),
    BuildFlag("encoder_precision", "--encoder-precision"), BuildFlag("encoder_input", "--encoder-input"),
    BuildFlag("limits.max_batch_size", "--max-batch-size"),
    BuildFlag("limits.max_audio_seconds", "--max-audio-seconds"),
    BuildFlag("limits.max_text_tokens", "--max-text-tokens"), BuildFlag("limits.max_new_tokens", "--max-new-tokens"),
    BuildFlag("calib_size", "--calib-size"), BuildFlag("calib_max_tokens", "--calib-max-tokens"),
    BuildFlag("stages", "--stages"),
    BuildFlag("variant", "--variant", optional=True), BuildFlag("calib_audio", "--calib-audio", optional=True),
    # on the machine that finishes the build, its GPU decides unless a target was named
    BuildFlag("target_sm", "--target-sm", optional=True),
)
_OPTIONAL_DEFAULTS = {"variant": "base"}


def rebuild_command(model: Path, out: Path, o: BuildOptions) -> str:
    """The `af3trt build` line that completes this engine dir on a machine with TensorRT / TensorRT-LLM,
    run from inside the engine dir (`--out .`: the dir can be copied there first; finished stages are
    skipped, the manifest records the new ones). The tiny model is named `tiny`, not its cache path."""
    name = "tiny" if Path(model).resolve() == default_tiny_dir().resolve() else str(model)
    argv = ["af3trt", "build", "--model", name, "--out", "."]
    for flag in BUILD_FLAGS:
        value = flag.value(o)
        if flag.optional and (not value or value == _OPTIONAL_DEFAULTS.get(flag.field)):
            continue
        argv += [flag.option, ",".join(value) if isinstance(value, tuple) else str(value)]
    return shlex.join(argv)
