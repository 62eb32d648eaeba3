"""Batched Whisper log-mel on the device: (W, 480000) float32 windows -> (W, 128, 3000) float32.

The reference is `af3trt.features.log_mel` (== `WhisperFeatureExtractor(feature_size=128)`):
periodic-Hann STFT (n_fft 400, hop 160, reflect padding of n_fft // 2 as torch.stft center=True),
|X|^2 without the last frame, Slaney mel filters, log10 clamped at 1e-10, floor at the window's
max - 8, then (x + 4) / 4. `LogMelSTFT` computes it two equivalent ways:

- "stft": `torch.stft` (cuFFT on CUDA) + mel matmul, the reference's own ops on any device.
- "dft":  the STFT as a conv1d of the reflect-padded samples with a fixed DFT basis (real and
  imaginary rows of the Hann-windowed DFT as 402 output channels of width 400, stride 160). It is
  made only of ops TensorRT parses (Pad reflect, Conv, Mul, Add, Slice, MatMul, Log, ReduceMax,
  Max), so the encoder ONNX graph can take raw 16 kHz windows. `torch.stft` cannot serve there:
  its complex output does not export, and TensorRT has no STFT layer.

Why "auto" picks "stft" in eager and "dft" only under ONNX export / tracing: for 20 windows
(10 min) the FFT is memory-bound, ~0.2 GB of traffic, and the whole stft log-mel measured 0.58 ms
on an H200 (shared/reference/af3.md). The DFT conv is 20 x 3001 x 402 x 400 x 2 = 19.3 GFLOP that
must stay in true FP32 (TF32's 10-bit mantissa gives ~1e-3 relative error in the power
spectrum, about 4e-4 in the output, over the 1e-4 budget), i.e. >= 0.3 ms at the ~60 TFLOP/s FP32
peak of an H100/H200 before cuDNN's efficiency on a 1-channel stride-160 conv: it cannot beat
cuFFT. `benchmarks/kernels_bench.py` times both paths so the choice is re-checked per card.
Whoever builds a TensorRT engine from the "dft" graph must keep these layers out of TF32 (clear
BuilderFlag.TF32 or pin their precision to FP32) for the same reason.

Precision: "stft" matches the reference to ~1e-7; "dft" to ~5e-5 on speech-like and tonal
windows. Against a float64 STFT, "dft" stays within ~2e-5 even on the hardest case tried (quiet
noise under a loud tone, partial window), where the float32 `torch.stft` reference itself is
~1.5e-4 off; there the two float32 paths differ by up to ~1.6e-4, the reference's own error.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..features import log_mel as log_mel_reference  # the pure-torch reference (STYLE rule 9)
from ..features import mel_filters
from ..spec import HOP_LENGTH, N_FFT, N_MELS, WINDOW_SAMPLES

__all__ = ["METHODS", "LogMelSTFT", "dft_basis", "log_mel_reference", "log_mel_windows"]

METHODS = ("auto", "stft", "dft")
LOG_CLAMP = 1e-10  # power floor before log10 (Whisper)
DYNAMIC_RANGE = 8.0  # log10 units kept below each window's max (80 dB)


def dft_basis(n_fft: int = N_FFT) -> torch.Tensor:
    """Periodic-Hann-windowed real DFT basis, (2 * (n_fft // 2 + 1), n_fft) float32.

    Rows [0, bins) are window * cos(2 pi k n / n_fft), rows [bins, 2 bins) are
    -window * sin(...), bins = n_fft // 2 + 1 (201 for n_fft 400). A frame `f` (n_fft samples)
    gives Re X_k = basis[k] . f and Im X_k = basis[bins + k] . f, as `torch.stft` does.
    Built in float64 and rounded once, so the basis itself adds no error beyond float32 rounding.
    """
    n = np.arange(n_fft, dtype=np.float64)
    k = np.arange(n_fft // 2 + 1, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)  # periodic Hann == torch.hann_window
    # (k * n) % n_fft keeps the angle argument exact before the trig call
    angle = 2.0 * np.pi * ((k[:, None] * n[None, :]) % n_fft) / n_fft
    basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window], axis=0)
    return torch.from_numpy(basis.astype(np.float32))


@contextlib.contextmanager
def _strict_fp32(device_type: str):
    """Run float32 convs/matmuls without TF32 on CUDA (see the module docstring for why).

    Flips process-wide torch flags for the duration and restores them; not for concurrent use
    from several threads. A no-op off CUDA and while exporting/tracing (the graph has no flags).
    torch refuses to mix its legacy TF32 switches with the `fp32_precision` ones, so this uses
    the family the process already uses: the legacy getter raises once the new API was set.
    """
    if device_type != "cuda" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        yield
        return
    try:
        saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        legacy = True
    except RuntimeError:
        saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        legacy = False
    _set_fp32_modes(legacy, "highest" if legacy else "ieee", False if legacy else "ieee")
    try:
        yield
    finally:
        _set_fp32_modes(legacy, *saved)


def _set_fp32_modes(legacy: bool, matmul, conv) -> None:
    if legacy:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = conv
    else:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv


class LogMelSTFT(nn.Module):
    """Whisper log-mel of zero-padded 30 s windows as one module.

    forward(samples): (W, L) float32 16 kHz samples, L = 480,000 for AF3 windows (any L > n_fft
    // 2 works) -> (W, 128, L // 160) float32 log-mel, equal to `af3trt.features.log_mel`
    within 1e-4. `method`: "auto" ("dft" while ONNX-exporting or tracing, else "stft"), "stft"
    or "dft". Buffers: `basis` (402, 1, 400) float32 DFT conv weight, `filters` (128, 201)
    float32 Slaney mel filters from `af3trt.features.mel_filters()`.
    """

    def __init__(self, method: str = "auto", *, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH, n_mels: int = N_MELS):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"expected method in {METHODS}, got {method!r}")
        self.method = method
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.bins = n_fft // 2 + 1
        self.register_buffer("basis", dft_basis(n_fft).unsqueeze(1), persistent=False)
        filters = mel_filters(n_mels=n_mels, n_fft=n_fft)  # (bins, n_mels) float64
        self.register_buffer("filters", torch.from_numpy(filters.T.astype(np.float32)).contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def _resolved_method(self) -> str:
        if self.method != "auto":
            return self.method
        return "dft" if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() else "stft"

    def _power_stft(self, samples: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(samples, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        return spec[..., :-1].abs() ** 2  # (W, bins, frames); the last frame is dropped (Whisper)

    def _power_dft(self, samples: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        padded = F.pad(samples.unsqueeze(1), (pad, pad), mode="reflect")  # center=True framing
        spec = F.conv1d(padded, self.basis, stride=self.hop_length)  # (W, 2 * bins, frames + 1)
        spec = spec[..., :-1]
        real, imag = spec[:, : self.bins], spec[:, self.bins :]
        return real * real + imag * imag

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        with _strict_fp32(samples.device.type):
            if self._resolved_method() == "stft":
                power = self._power_stft(samples)
            else:
                power = self._power_dft(samples)
            mel = torch.matmul(self.filters, power)  # (n_mels, bins) @ (W, bins, T) -> (W, n_mels, T)
        logspec = torch.log(torch.clamp(mel, min=LOG_CLAMP)) * (1.0 / math.log(10.0))
        peak = torch.amax(logspec, dim=(1, 2), keepdim=True)
        logspec = torch.maximum(logspec, peak - DYNAMIC_RANGE)
        return (logspec + 4.0) / 4.0


@lru_cache(maxsize=8)
def _module(method: str, device: torch.device) -> LogMelSTFT:
    return LogMelSTFT(method).to(device).eval()


def log_mel_windows(samples, *, method: str = "auto") -> torch.Tensor:
    """Validating wrapper: (W, 480000) float32 windows (torch tensor on any device, or numpy)
    -> (W, 128, 3000) float32 log-mel on the same device.

    Windows are zero-padded 30 s windows (`af3trt.features.pad_windows`); W may be 0. A cached
    `LogMelSTFT` per (method, device) holds the DFT basis and mel filters on the device.
    """
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples)
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array of samples, got {type(samples).__name__}")
    if samples.dim() != 2 or samples.shape[1] != WINDOW_SAMPLES:
        raise ValueError(f"expected windows of shape (W, {WINDOW_SAMPLES}), got {tuple(samples.shape)}")
    if samples.dtype != torch.float32:
        raise ValueError(f"expected float32 samples, got {samples.dtype}")
    if method not in METHODS:
        raise ValueError(f"expected method in {METHODS}, got {method!r}")
    if samples.shape[0] == 0:
        return samples.new_zeros((0, N_MELS, WINDOW_SAMPLES // HOP_LENGTH))
    with torch.inference_mode():
        return _module(method, samples.device)(samples.contiguous())
