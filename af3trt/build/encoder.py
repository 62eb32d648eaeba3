"""Encoder + projector -> ONNX (dynamic windows) -> ModelOpt Q/DQ ONNX -> TensorRT plan.

Three stages, each a pure function, with `python -m af3trt.build.encoder {onnx,quantize,plan}` as
the thin CLI:
- `export_onnx`: `AudioEncoder` -> ENGINE_DIR/encoder/encoder.onnx (+ encoder.onnx.data when the
  weights pass ~1.5 GB), then ONNX Runtime CPU must reproduce the torch module on 1 and 3 windows
  (one partial) or the export raises; written in a temp folder and renamed into place. The graph
  takes log-mel windows, or (inputs="audio") padded 16 kHz windows and computes the log-mel itself
  with the conv-based STFT of af3trt.kernels.logmel (`AudioInputEncoder`).
- `quantize_onnx` (af3trt.build.encoder_quant, re-exported here): ModelOpt ONNX PTQ (INT8 / FP8 Q/DQ)
  calibrated on log-mel windows of real audio.
- `build_plan` (af3trt.build.encoder_plan, re-exported here): TensorRT Python API -> encoder.plan.
Each stage records itself in encoder/config.json (sections io, onnx, quantized, plan).
The graph's I/O (names, dtypes, dynamic axis) is `EncoderIO` and config.json's format is `read_config`, both
declared once in af3trt.formats.encoder_io (the runtime backends read them too) and re-exported here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from .. import fileio
from ..checkpoint import Checkpoint
from ..errors import MissingDependency, lookup
from ..fileio import staged_dir
from ..formats.encoder_io import (CONFIG_FILE, CONFIG_FORMAT, CONFIG_VERSION, FRONT_END_SCOPE,  # noqa: F401
                                  INPUT_KINDS, IO, ONNX_DATA_FILE, ONNX_FILE, EncoderIO, external_data_files,
                                  matching_section, read_config, update_config)
from ..formats.manifest import package_versions, stage_key
from ..kernels.logmel import LogMelSTFT
from ..runtime.encoder import AudioEncoder, OnnxRuntimeEncoder, TorchEncoder
from ..spec import FRAMES_PER_WINDOW, MAX_WINDOWS
from . import encoder_plan
from .calibration import calibration_windows
from .encoder_check import (DEFAULT_CALIBRATION_WINDOWS, _verification_batches,  # noqa: F401
                            _verification_windows, cosine_similarity, relative_error)
from .encoder_plan import (PLAN_PRECISIONS, GraphFacts, PlanBuildError, PlanResult, build_plan,  # noqa: F401
                           graph_facts, plan_command)
from .encoder_quant import QUANT_PRECISIONS, QuantizationError, QuantizeResult, quantize_onnx  # noqa: F401
from .stage_log import clock, phase, progress, say

__all__ = ["EncoderIO", "IO", "AudioInputEncoder", "FRONT_END_SCOPE", "export_onnx", "quantize_onnx", "read_config",
           "update_config", "relative_error", "cosine_similarity", "ExportVerificationError", "QuantizationError",
           "QuantizeResult", "QUANT_PRECISIONS", "build_plan", "PlanBuildError", "PlanResult", "PLAN_PRECISIONS",
           "GraphFacts", "graph_facts", "plan_command", "main"]
STAGE = "encoder_onnx"  # the name its progress lines carry (af3trt build's stage)
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB of weights: beyond it, weights go to encoder.onnx.data (protobuf caps at 2 GiB)
# fp32 graph that takes audio vs the torch module on the reference log-mel: the graph's conv STFT
# log-mel is up to 4.9e-5 (absolute) off the reference on the verification windows (ONNX Runtime CPU),
# which the tiny model turns into 2.6e-6 relative on its embeddings; 1e-3 leaves a deep encoder room
# to amplify it (the features graph's 1e-4 budget holds where both sides see the same log-mel)
AUDIO_FP32_TOLERANCE = 1e-3


class ExportVerificationError(ValueError):
    """The exported graph does not reproduce the torch reference within the dtype's tolerance."""


@dataclass(frozen=True)
class OnnxDtype:
    """Export dtype: `tolerance` = max relative error on valid rows vs the float32 torch reference;
    `audio_tolerance` the same for a graph that takes audio (its conv STFT adds ~5e-5 to the log-mel)."""

    name: str
    torch_dtype: torch.dtype
    numpy_dtype: str
    tolerance: float
    audio_tolerance: float

    def tolerance_for(self, takes: str) -> float:
        return self.audio_tolerance if takes == "audio" else self.tolerance


ONNX_DTYPES = MappingProxyType({
    "fp32": OnnxDtype("fp32", torch.float32, "float32", 1e-4, AUDIO_FP32_TOLERANCE),
    "fp16": OnnxDtype("fp16", torch.float16, "float16", 1e-2, 1e-2),
})
# -- export -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    config_path: Path
    dtype: str
    external_data: bool
    max_rel_error: float | None
    skipped: bool = False


class AudioInputEncoder(nn.Module):
    """forward(audio (W, 480000) float32 padded windows, frames (W,)) -> (W, 750, H): the log-mel by
    `LogMelSTFT("dft")` (float32, TensorRT-parsable ops only), then `encoder` (which casts it to its dtype)."""

    def __init__(self, encoder: AudioEncoder):
        super().__init__()
        self.logmel = LogMelSTFT("dft")  # named as FRONT_END_SCOPE says
        self.encoder = encoder

    def forward(self, audio: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.logmel(audio), frames)


def _module_for_export(ckpt, dtype: OnnxDtype) -> AudioEncoder:
    return AudioEncoder.from_checkpoint(ckpt, dtype.torch_dtype)


def _export_graph(module: nn.Module, path: Path, opset: int, external: bool, io: EncoderIO = IO) -> None:
    """torch.onnx.export (TorchScript exporter), then re-save with all weights in one external file if asked;
    each step a progress line of STAGE with its elapsed time (the size it works on in the first)."""
    import onnx

    raw = Path(fileio.mkdtemp(prefix=".raw-", dir=path.parent)) / path.name
    example = (torch.zeros(io.signal_shape(2)), torch.tensor([FRAMES_PER_WINDOW, FRAMES_PER_WINDOW // 3]))
    params = sum(p.numel() for p in module.parameters())
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with phase(f"{STAGE}: tracing and exporting {params / 1e6:.1f} M parameters ({size / 1e9:.2f} GB) with "
                   f"torch.onnx.export, opset {opset}"), \
                torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # reflect Pad's pads
            torch.onnx.export(module.eval(), example, str(raw), input_names=list(io.inputs),
                              output_names=list(io.outputs), dynamic_axes=io.dynamic_axes(), opset_version=opset,
                              dynamo=False)
        with phase(f"{STAGE}: saving the graph" + (f" with its weights in {ONNX_DATA_FILE}" if external else "")):
            model = onnx.load(str(raw))  # also pulls in the per-tensor files torch writes beside a > 2 GiB graph
            if external:
                onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=ONNX_DATA_FILE, size_threshold=1024)
            else:
                onnx.save_model(model, str(path))
    finally:
        shutil.rmtree(raw.parent, ignore_errors=True)
    for name in (path.name, *([ONNX_DATA_FILE] if external else [])):
        fileio.like_umask(path.parent / name)  # onnx may write the data file 0600
    with phase(f"{STAGE}: onnx.checker.check_model"):
        onnx.checker.check_model(str(path))


def _verify_export(path: Path, reference: AudioEncoder, dtype: OnnxDtype, where: Path, io: EncoderIO = IO) -> dict:
    """Run the graph on ONNX Runtime CPU and the float32 torch reference fed the reference log-mel
    (af3trt.features.log_mel); raise past the tolerance. A graph that takes audio gets the padded
    windows that log-mel came from. where: the final path named in errors (`path` lies in the
    stage's temporary folder)."""
    with phase(f"{STAGE}: ONNX Runtime session (graph optimization)"):
        ort_encoder = OnnxRuntimeEncoder(path)
    torch_encoder = TorchEncoder(reference)
    tolerance = dtype.tolerance_for(io.takes)
    errors = []
    batches = _verification_windows()
    t0 = time.perf_counter()
    # windows as the unit: the cost of a batch is its windows, so the bar's ETA holds across batch sizes
    bar = progress(None, f"{STAGE}: ONNX Runtime vs torch", total=sum(len(f) for _, _, f in batches), unit="window")
    for audio, feats, frames in batches:
        ref = torch_encoder(feats, frames)
        got = ort_encoder(audio if io.takes == "audio" else feats, frames)
        if tuple(got.shape) != tuple(ref.shape):
            raise ExportVerificationError(f"expected ONNX Runtime output {tuple(ref.shape)} from {where}, "
                                          f"got {tuple(got.shape)}")
        errors.append(relative_error(got, ref, frames))
        if bar is not None:
            bar.update(len(frames))
    if bar is not None:
        bar.close()
    worst = max(errors)
    say(f"{STAGE}: ONNX Runtime vs torch: done in {clock(time.perf_counter() - t0)} ({len(errors)} batches, "
        f"max relative error {worst:.1e})")
    if not worst <= tolerance:  # `not <=` also catches NaN
        raise ExportVerificationError(
            f"ONNX Runtime output of {where} differs from the torch reference: max relative error {worst:.3e} on "
            f"valid rows (1 and 3 windows, one partial), expected <= {tolerance:.0e} for {dtype.name} with "
            f"{io.takes} input")
    return {"windows": [1, 3], "max_rel_error": worst, "per_batch": errors, "tolerance": tolerance}


def _open_checkpoint(checkpoint):
    return checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)


def _check_replaceable(final: Path) -> None:
    """The stage replaces `final` whole: refuse a folder that is not an earlier encoder export."""
    if not final.exists():
        return
    if not final.is_dir():
        raise FileExistsError(f"expected a folder for the encoder export, got a file: {final}")
    try:
        read_config(final)
    except (FileNotFoundError, ValueError):
        if any(final.iterdir()):
            raise FileExistsError(f"expected an empty folder or an earlier encoder export at {final}, got a folder "
                                  f"with other files (it would be replaced): pass e.g. ENGINE_DIR/encoder") from None


def _existing_export(final: Path, key: str, verify: bool) -> ExportResult | None:
    onnx_section = matching_section(final, "onnx", key, ONNX_FILE)
    if onnx_section is None:
        return None
    check = onnx_section.get("verification")
    if verify and check is None:
        return None
    return ExportResult(final / ONNX_FILE, final / CONFIG_FILE, onnx_section["dtype"],
                        bool(onnx_section["external_data"]), check and check["max_rel_error"], skipped=True)


def export_onnx(*, checkpoint, out_dir, dtype: str = "fp32", opset: int = 17, verify: bool = True,
                max_windows: int = MAX_WINDOWS, external_data: bool | None = None, force: bool = False,
                inputs: str = "features") -> ExportResult:
    """Export AF3's encoder + projector to OUT_DIR/encoder.onnx (+ config.json) and verify it.

    out_dir: the encoder folder, ENGINE_DIR/encoder (DESIGN §3); it is replaced whole, so it must be
    empty, absent or an earlier export. checkpoint: AF3 checkpoint dir or `Checkpoint`. dtype:
    "fp32" | "fp16" graph weights (inputs stay float32 log-mel + int64 frames; output (W, 750,
    hidden) in that dtype). inputs: "features" (W, 128, 3000) log-mel windows, or "audio" (W,
    480000) float32 zero-padded 16 kHz windows (`features.pad_windows`): the graph then computes the
    log-mel itself (`AudioInputEncoder`, float32 whatever `dtype`); recorded as io.takes in
    config.json. external_data: None = only past EXTERNAL_DATA_BYTES of weights; True forces
    encoder.onnx.data. max_windows: the largest W the deployment uses (recorded; build_plan's
    default profile maximum). verify: ONNX Runtime CPU vs the float32 torch module fed the reference
    log-mel, raising ExportVerificationError past the dtype's tolerance for that input kind.
    An unchanged export (same checkpoint fingerprint and flags) is skipped unless `force`.
    """
    spec = lookup(ONNX_DTYPES, dtype, "ONNX export dtype")
    io = IO.for_input(inputs)  # raises for an unknown kind
    if not 1 <= int(max_windows):
        raise ValueError(f"expected max_windows >= 1, got {max_windows}")
    ckpt = _open_checkpoint(checkpoint)
    final = Path(out_dir)
    _check_replaceable(final)
    fingerprint = ckpt.fingerprint()
    key = stage_key(fingerprint=fingerprint, dtype=dtype, opset=opset, external_data=external_data,
                    max_windows=int(max_windows), inputs=inputs)
    if not force and (done := _existing_export(final, key, verify)) is not None:
        return done
    encoder = _module_for_export(ckpt, spec)
    module = AudioInputEncoder(encoder) if io.takes == "audio" else encoder
    external = external_data if external_data is not None else (
        sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES)
    with staged_dir(final) as tmp:
        _export_graph(module, tmp / ONNX_FILE, opset, external, io)
        check = None
        if verify:
            reference = encoder if spec.torch_dtype == torch.float32 else AudioEncoder.from_checkpoint(ckpt)
            check = _verify_export(tmp / ONNX_FILE, reference, spec, final / ONNX_FILE, io)
        hidden = ckpt.spec.text.hidden_size
        update_config(tmp, io=io.describe(hidden, spec.numpy_dtype), onnx={
            "file": ONNX_FILE, "external_data": ONNX_DATA_FILE if external else None, "dtype": dtype,
            "opset": opset, "hidden_size": hidden, "max_windows": int(max_windows), "key": key,
            "checkpoint": {"path": str(ckpt.path), "fingerprint": fingerprint}, "verification": check,
            "versions": package_versions()})
    return ExportResult(final / ONNX_FILE, final / CONFIG_FILE, dtype, external, check and check["max_rel_error"])


# -- CLI -----------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m af3trt.build.encoder", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="stage", required=True)
    o = sub.add_parser("onnx", help="export + verify OUT/encoder.onnx")
    o.add_argument("--checkpoint", required=True, help="AF3 checkpoint dir (HF layout, safetensors)")
    o.add_argument("--out", required=True, help="encoder folder, ENGINE_DIR/encoder (replaced whole)")
    o.add_argument("--dtype", choices=sorted(ONNX_DTYPES), default="fp32")
    o.add_argument("--inputs", choices=INPUT_KINDS, default="features",
                   help="first graph input: log-mel features, or padded 16 kHz audio windows (conv STFT inside)")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--max-windows", type=int, default=MAX_WINDOWS)
    o.add_argument("--external-data", action="store_true", default=None, help="force encoder.onnx.data")
    o.add_argument("--no-verify", dest="verify", action="store_false")
    o.add_argument("--force", action="store_true")
    q = sub.add_parser("quantize", help="ModelOpt ONNX PTQ -> Q/DQ encoder ONNX")
    q.add_argument("--onnx", required=True)
    q.add_argument("--out", default=None, help="output .onnx (default encoder.PRECISION.onnx beside --onnx)")
    q.add_argument("--precision", choices=sorted(QUANT_PRECISIONS), default="int8")
    q.add_argument("--audio-dir", default=None, help="calibration audio folder (default: bundled + synthetic)")
    q.add_argument("--count", type=int, default=DEFAULT_CALIBRATION_WINDOWS, help="calibration windows")
    q.add_argument("--calibration-method", default=None, help="ModelOpt method (int8/fp8: entropy | max)")
    q.add_argument("--high-precision-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    q.add_argument("--no-verify", dest="verify", action="store_false")
    b = sub.add_parser("plan", help="TensorRT plan from an encoder ONNX")
    b.add_argument("--onnx", required=True)
    b.add_argument("--out", default=None, help="folder for encoder.plan (default: the ONNX's folder)")
    b.add_argument("--precision", choices=sorted(encoder_plan.PLAN_PRECISIONS), default="fp16")
    b.add_argument("--profile", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"), default=None, help="windows")
    b.add_argument("--timing-cache", default=None)
    b.add_argument("--workspace-gib", type=float, default=None)
    b.add_argument("--force", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.stage == "onnx":
            result = export_onnx(checkpoint=args.checkpoint, out_dir=args.out, dtype=args.dtype, opset=args.opset,
                                 verify=args.verify, max_windows=args.max_windows, external_data=args.external_data,
                                 force=args.force, inputs=args.inputs)
        elif args.stage == "quantize":
            result = quantize_onnx(args.onnx, args.out, args.precision, calibration_windows(args.audio_dir, args.count),
                                   calibration_method=args.calibration_method,
                                   high_precision_dtype=args.high_precision_dtype, verify=args.verify)
        else:
            result = build_plan(args.onnx, args.out, precision=args.precision, profile=args.profile,
                                timing_cache=args.timing_cache, workspace_gib=args.workspace_gib, force=args.force)
    except MissingDependency as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(asdict(result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
