"""Whisper log-mel front end (reference): windows of 16 kHz samples -> (W, 128, 3000) log-mel + mask.

Equal to `WhisperFeatureExtractor(feature_size=128)` of transformers (its torch path): periodic
Hann window, |STFT|^2 without the last frame, Slaney mel filters (0-8 kHz), log10 clamped at
1e-10, floored at (window max - 8), then (x + 4) / 4. Each window is zero-padded to 30 s first,
so the normalization max runs over the whole padded window, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .audio import split_windows
from .spec import FRAMES_PER_WINDOW, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WINDOW_SAMPLES, mel_frames_for_samples

_MIN_LOG_HZ = 1000.0  # Slaney scale: linear below 1 kHz, logarithmic above
_MIN_LOG_MEL = 15.0  # = 3 * 1000 / 200
_MELS_PER_LOG_HZ = 27.0 / np.log(6.4)  # 27 mels per factor 6.4 above 1 kHz


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    linear = 3.0 * freq / 200.0
    logpart = _MIN_LOG_MEL + np.log(np.maximum(freq, 1e-12) / _MIN_LOG_HZ) * _MELS_PER_LOG_HZ
    return np.where(freq >= _MIN_LOG_HZ, logpart, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    logpart = _MIN_LOG_HZ * np.exp((mel - _MIN_LOG_MEL) / _MELS_PER_LOG_HZ)
    return np.where(mel >= _MIN_LOG_MEL, logpart, linear)


@lru_cache(maxsize=4)
def _mel_filters_cached(n_mels: int = N_MELS, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalized triangular mel filters, (n_fft // 2 + 1, n_mels) float64, 0 Hz to Nyquist."""
    fft_freqs = np.linspace(0.0, sampling_rate // 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sampling_rate / 2), n_mels + 2))
    widths = np.diff(edges)
    offsets = edges[None, :] - fft_freqs[:, None]  # (bins, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= (2.0 / (edges[2:] - edges[:-2]))[None, :]
    return filters


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalized triangular mel filters, (n_fft // 2 + 1, n_mels) float64, 0 Hz to Nyquist."""
    return _mel_filters_cached(n_mels, n_fft, sampling_rate).copy()


@dataclass(frozen=True)
class Features:
    """Log-mel windows of one or more audios.

    features: (W, 128, 3000) float32 log-mel; mask: (W, 3000) int32, 1 on valid frames;
    windows_per_audio: how many consecutive windows belong to each audio, in order.
    """

    features: np.ndarray
    mask: np.ndarray
    windows_per_audio: tuple[int, ...]

    @property
    def valid_frames(self) -> np.ndarray:
        """(W,) valid mel frames per window."""
        return self.mask.sum(axis=1)


def pad_windows(windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad each window to 30 s: returns (W, 480000) float32 samples and (W, 3000) int32 frame mask."""
    batch = np.zeros((len(windows), WINDOW_SAMPLES), dtype=np.float32)
    mask = np.zeros((len(windows), FRAMES_PER_WINDOW), dtype=np.int32)
    for i, w in enumerate(windows):
        if not 0 < w.shape[0] <= WINDOW_SAMPLES:
            raise ValueError(f"expected a window of 1..{WINDOW_SAMPLES} samples, got {w.shape[0]}")
        batch[i, : w.shape[0]] = w
        mask[i, : mel_frames_for_samples(w.shape[0])] = 1
    return batch, mask


def log_mel(samples, device: str = "cpu"):
    """(W, 480000) float32 padded windows -> (W, 128, 3000) float32 log-mel (torch tensor on `device`)."""
    import torch

    x = torch.as_tensor(samples, dtype=torch.float32, device=device)
    window = torch.hann_window(N_FFT, device=x.device)
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = (spec[..., :-1].abs() ** 2).contiguous()  # drop the last frame: 3,001 -> 3,000
    filters = torch.as_tensor(mel_filters(), dtype=torch.float32, device=x.device)
    mel = filters.T @ power
    logspec = torch.clamp(mel, min=1e-10).log10()
    peak = logspec.amax(dim=(1, 2), keepdim=True)
    logspec = torch.maximum(logspec, peak - 8.0)
    return (logspec + 4.0) / 4.0


def padded_windows(audios: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The 30 s windows of all audios in order, zero-padded: (W, 480000) float32 samples, (W, 3000)
    int32 frame mask, and how many windows each audio has."""
    parts = [split_windows(a) for a in audios]
    windows = [w for p in parts for w in p]
    if not windows:
        return (np.zeros((0, WINDOW_SAMPLES), np.float32), np.zeros((0, FRAMES_PER_WINDOW), np.int32),
                tuple(len(p) for p in parts))
    batch, mask = pad_windows(windows)
    return batch, mask, tuple(len(p) for p in parts)


def extract_features(audios: list[np.ndarray], device: str = "cpu") -> Features:
    """16 kHz mono float32 audios (each ≤ 10 min) -> log-mel windows of them all, in order."""
    batch, mask, counts = padded_windows(audios)
    if not len(batch):
        return Features(np.zeros((0, N_MELS, FRAMES_PER_WINDOW), np.float32), mask, ())
    return Features(log_mel(batch, device=device).cpu().numpy(), mask, counts)
