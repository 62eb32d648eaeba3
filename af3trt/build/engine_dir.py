"""`af3trt build`: AF3 checkpoint -> engine directory (DESIGN §3), one stage after another.

Stages: tokenizer (tokenizer, chat template, processor and model configs) -> encoder_onnx ->
encoder_plan (TensorRT) -> llm_checkpoint (TensorRT-LLM checkpoint via ModelOpt) -> llm_engine
(trtllm-build). Each stage writes into a temporary folder and is renamed into place when complete;
a stage whose key (checkpoint fingerprint + flags) is unchanged is skipped. Where tensorrt or
tensorrt_llm is missing, the stages before still complete and the manifest records the exact
command that finishes the build on a machine that has them. The stages themselves: af3trt.build.stages.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ExistingOutputError, OptionError
from ..fileio import clean_partials
from ..formats.encoder_io import INPUT_KINDS
from ..formats.manifest import Manifest, ManifestError, StageRecord, output_problems, output_record, stage_key
from ..think import check_variant, open_checkpoint, variant_record
from .calibration import audio_files
from .engine_rules import check_build, target_gpu
from .llm import EngineLimits, _check_tp
from ..formats.precision import get_kv_cache, get_precision
from .stage_log import stage_output
from .stages import GROUPS, STAGES, selected, windows_profile

log = logging.getLogger(__name__)

ENCODER_PLAN_PRECISIONS = ("fp16", "bf16", "fp8", "int8")
ENCODER_INPUTS = INPUT_KINDS  # what the encoder graph takes: formats.encoder_io's tuple itself
STAGE_NAMES = GROUPS  # the values of --stages


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
    if "llm" in options.stages:
        _check_tp(spec.text, get_precision(options.precision), options.tp_size)
    if options.calib_audio is not None:
        audio_files(options.calib_audio)


def limits_record(limits) -> dict:
    """manifest.json `limits`: the EngineLimits and what they derive. max_audio_tokens = prompt-table
    rows per request (max_prompt_embedding_table_size // max_batch_size); max_windows = encoder
    windows one call may hold (the plan's profile maximum)."""
    return {**asdict(limits), "max_audio_tokens": limits.audio_tokens_per_request,
            "max_windows": windows_profile(limits)[2], "max_input_len": limits.max_input_len,
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
    ckpt = open_checkpoint(model, options.variant)
    check_options(options, ckpt.spec)
    out = Path(out)
    _check_same_variant(out, options)
    out.mkdir(parents=True, exist_ok=True)
    clean_partials(out)
    plugins = None
    if "llm" in options.stages:  # refuse what trtllm-build refuses before anything (calibration) runs
        target = target_gpu(options.target_sm)
        plugins = (target, check_build(options.precision, options.kv_cache, target))
    fingerprint = ckpt.fingerprint()  # a think checkpoint's covers its think/ files: every stage key does
    earlier = _earlier_stages(out, fingerprint)
    manifest = _start_manifest(out, ckpt, fingerprint, options)
    manifest.variant = _variant_record(ckpt)
    if plugins is not None:  # what trtllm-build will make of the flags on that GPU (the engine's own, once built)
        manifest.precision.update(target_gpu=plugins[0].record(), engine_plugins=plugins[1].record())
    plan = selected(options)
    bar = _progress(len(plan))
    try:
        for stage in plan:
            name = stage.name
            key = _key(name, fingerprint, options, manifest.stages)
            entry = manifest.stages.pop(name, None)  # re-inserted below: the manifest lists stages in build order
            problems = None
            if not options.force and entry is not None and entry.key == key and entry.built:
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
                    facts = stage.run(ckpt, out, stage_options, manifest)
                entry = StageRecord.read({"key": key, "checkpoint": fingerprint, **facts})
                if entry.built:
                    entry = dataclasses.replace(entry, outputs=output_record(out, stage.outputs(entry)))
                manifest.stages[name] = entry
                manifest.write(out)
                if summary is not None:
                    summary[name] = _outcome(entry, earlier.get(name), problems, options.force)
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
    return {name: why for name, entry in old.stages.items() if entry.built}


def _outcome(record: StageRecord, earlier: str | None, problems: list[str] | None, force: bool) -> str:
    """The build summary's word for a stage that ran (see build_engine_dir's `summary`)."""
    if not record.built:
        return f"left for a machine that has {record.needs}"
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
            if entry.key == _key(name, fingerprint, options, old.stages):
                manifest.stages[name] = entry
            elif entry.built:
                _remove(out / entry.path)
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
    record = variant_record(ckpt)
    if record["name"] != "base":
        log.info("variant %s: adapter %s, %d LoRA modules merged, %d non-LoRA tensors applied",
                 record["name"], record["adapter"], record["lora_modules"], record["non_lora"]["applied"])
    return record


def _key(name: str, fingerprint: str, options: BuildOptions, stages: dict) -> str:
    """A stage's key: what it reads. The checkpoint fingerprint covers every file of the checkpoint
    (weights, tokenizer, templates, think/); its flags; the recorded outputs of the stage it is built
    from (a rebuilt ONNX graph or TRT-LLM checkpoint means a new plan or engine)."""
    up = (stages.get(STAGES[name].upstream or "") or {}).get("outputs")
    return stage_key(stage=name, checkpoint=fingerprint, options=_stage_flags(name, options),
                     upstream=stage_key(outputs=up) if up else None)


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
    """What enters stage `name`'s key besides the checkpoint and its upstream (`Stage.flags`), and the
    GPU's identity for a GPU-specific artifact."""
    stage = STAGES[name]
    return {**stage.flags(o), **({"gpu": gpu_identity()} if stage.gpu else {})}
