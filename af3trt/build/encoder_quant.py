"""ModelOpt ONNX PTQ of the encoder graph: float ONNX -> INT8 / FP8 Q/DQ ONNX for strongly typed
TensorRT plans, calibrated on log-mel windows of real audio and checked against the float graph on
ONNX Runtime (per-row cosine of the valid embedding rows). `python -m af3trt.build.encoder quantize`
is its CLI; `af3trt.build.encoder.quantize_onnx` serves it too.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from .. import fileio
from ..errors import MissingDependency, lookup
from ..formats.encoder_io import CONFIG_FILE, IO, external_data_files, read_config, update_config
from ..runtime.encoder import OnnxRuntimeEncoder
from .calibration import CalibrationWindows, calibration_windows
from .encoder_check import DEFAULT_CALIBRATION_WINDOWS, _verification_batches, cosine_similarity
from .encoder_plan import graph_facts
from .stage_log import phase


class QuantizationError(ValueError):
    """The Q/DQ graph strays from the float graph past its cosine-similarity budget."""


@dataclass(frozen=True)
class QuantPrecision:
    """ModelOpt ONNX PTQ mode; `min_cosine` = default budget (per-row cosine to the float graph)."""

    name: str
    modelopt_mode: str
    description: str
    min_cosine: float


QUANT_PRECISIONS = MappingProxyType({
    "int8": QuantPrecision("int8", "int8", "INT8 W8A8: per-channel weights, per-tensor activations", 0.9),
    "fp8": QuantPrecision("fp8", "fp8", "FP8 E4M3 W8A8, per-tensor scales (TensorRT on SM89+)", 0.9),
})


@dataclass(frozen=True)
class QuantizeResult:
    onnx_path: Path
    precision: str
    calibration_windows: int
    cosine_min: float | None
    cosine_mean: float | None


def _calibration(calibration):
    if calibration is None:
        return calibration_windows(count=DEFAULT_CALIBRATION_WINDOWS)
    if isinstance(calibration, CalibrationWindows):
        return calibration
    if isinstance(calibration, (str, Path)):
        return calibration_windows(calibration, count=DEFAULT_CALIBRATION_WINDOWS)
    raise TypeError(f"expected calibration None, an audio folder or CalibrationWindows, "
                    f"got {type(calibration).__name__}")


def _modelopt_quantize(src: Path, dst: Path, spec: QuantPrecision, cal, method, high_precision_dtype: str,
                       eps, external: bool) -> None:
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise MissingDependency(
            "ModelOpt ONNX PTQ needs nvidia-modelopt's ONNX extras: `pip install onnx-graphsurgeon==0.6.1 "
            f"onnxslim==0.1.98 onnxscript==0.7.2 lief==1.0.0`; import failed: {exc}") from exc
    quantize(str(src), quantize_mode=spec.modelopt_mode, calibration_data=cal.as_inputs(IO.features, IO.frames),
             calibration_method=method, calibration_eps=list(eps), output_path=str(dst),
             high_precision_dtype=high_precision_dtype, use_external_data_format=external, log_level="WARNING")
    if not dst.is_file():
        raise QuantizationError(f"expected ModelOpt to write {dst}, found no file")


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def _quantized_cosine(float_onnx: Path, qdq_onnx: Path) -> tuple[float, float]:
    device = "cuda" if _ort_cuda() else "cpu"  # a cosine budget, not a bit-level check: the GPU will do
    ref_encoder = OnnxRuntimeEncoder(float_onnx, device=device)
    q_encoder = OnnxRuntimeEncoder(qdq_onnx, device=device)
    stats = [cosine_similarity(q_encoder(f, n), ref_encoder(f, n), n) for f, n in _verification_batches()]
    return min(s[0] for s in stats), float(np.mean([s[1] for s in stats]))


def _check_quantizable(src: Path) -> None:
    """Only a features-input graph: calibration feeds log-mel windows, and an audio-input graph's
    conv STFT must stay float32 (af3trt.kernels.logmel)."""
    takes = graph_facts(src).takes
    if takes != "features":
        raise ValueError(f"expected a features-input encoder graph to quantize (export_onnx(inputs='features')), "
                         f"got an {takes}-input graph: {src}")


def quantize_onnx(onnx_path, out_path=None, precision: str = "int8", calibration=None, *,
                  calibration_method: str | None = None, high_precision_dtype: str = "fp16",
                  calibration_eps=None, verify: bool = True, min_cosine: float | None = None) -> QuantizeResult:
    """ModelOpt ONNX PTQ of the float graph `onnx_path` -> Q/DQ graph `out_path` (default
    encoder.{precision}.onnx beside it; ModelOpt's `<name>_data` beside it for large graphs).

    calibration: None (bundled speech + synthetic speech-like windows), an audio folder, or
    `CalibrationWindows`. high_precision_dtype: dtype of the unquantized ops ("fp16" for TensorRT,
    "fp32" keeps them float32). calibration_eps: ModelOpt's execution providers in priority order
    (default: cuda:0 then cpu where ONNX Runtime has CUDA, else cpu). verify: per-row cosine of the
    valid rows against the float graph on ONNX Runtime (1 and 3 windows, not the calibration ones);
    raises QuantizationError below `min_cosine` (default: the precision's budget).
    """
    spec = lookup(QUANT_PRECISIONS, precision, "quantization precision")
    src = Path(onnx_path)
    if not src.is_file():
        raise FileNotFoundError(f"expected a float encoder ONNX file, got {src} (no such file)")
    _check_quantizable(src)
    out = Path(out_path) if out_path else src.with_name(f"encoder.{precision}.onnx")
    cal = _calibration(calibration)
    eps = list(calibration_eps) if calibration_eps else (["cuda:0", "cpu"] if _ort_cuda() else ["cpu"])
    budget = spec.min_cosine if min_cosine is None else min_cosine
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(fileio.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        extra = external_data_files(src)
        for name in [src.name, *extra]:  # ModelOpt writes beside its input: work on a copy
            shutil.copyfile(src.parent / name, tmp / name)
        with phase(f"encoder_plan: ModelOpt {precision} Q/DQ quantization on {len(cal)} calibration windows"):
            _modelopt_quantize(tmp / src.name, tmp / out.name, spec, cal, calibration_method, high_precision_dtype,
                               eps, external=bool(extra))
        cos = (None, None)
        if verify:
            with phase(f"encoder_plan: {precision} Q/DQ graph vs the float graph on ONNX Runtime"):
                cos = _quantized_cosine(src, tmp / out.name)
        if verify and not cos[0] >= budget:
            raise QuantizationError(f"{precision} Q/DQ graph strays from {src}: min per-row cosine {cos[0]:.4f} "
                                    f"(mean {cos[1]:.4f}), expected >= {budget}")
        fileio.tree_like_umask(tmp)
        for name in external_data_files(tmp / out.name):
            os.replace(tmp / name, out.parent / name)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    section = dict(read_config(out.parent).get("quantized") or {}) if (out.parent / CONFIG_FILE).is_file() else {}
    section[precision] = {"file": out.name, "source": src.name, "calibration_windows": len(cal),
                          "calibration_sources": sorted(set(cal.sources)), "calibration_method": calibration_method,
                          "high_precision_dtype": high_precision_dtype, "cosine_min": cos[0], "cosine_mean": cos[1]}
    update_config(out.parent, quantized=section)
    return QuantizeResult(out, precision, len(cal), cos[0], cos[1])
