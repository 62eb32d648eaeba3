"""Audio decoding and windowing: path, bytes or array -> 16 kHz mono float32 -> 30 s windows.

WAV, FLAC, MP3 and OGG are decoded with libsndfile (soundfile), channels averaged, then resampled with
soxr HQ and padded/trimmed to ceil(n * 16000 / rate) samples: transformers' `load_audio` (soundfile
backend, = `librosa.load`), so the same file gives the reference's samples.
URLs are refused: audio comes as files, bytes or arrays (no network access at run time).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .spec import MAX_AUDIO_SAMPLES, MAX_AUDIO_SECONDS, SAMPLE_RATE, WINDOW_SAMPLES

logger = logging.getLogger(__name__)


class AudioError(ValueError):
    """Raised for audio that cannot be used: unreadable, not audio, empty, NaN/Inf, wrong type."""


class AudioTruncatedWarning(UserWarning):
    """Audio longer than MAX_AUDIO_SECONDS was cut to its first MAX_AUDIO_SECONDS."""


@dataclass(frozen=True)
class Audio:
    """Decoded audio: `samples` (N,) float32 mono at 16 kHz; `source` names where it came from."""

    samples: np.ndarray
    source: str
    truncated: bool = False
    original_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE


def _describe(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {source.shape}>"
    return f"<{type(source).__name__}>"


def _decode_file(data, name: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        samples, rate = sf.read(data, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError by format
        raise AudioError(
            f"expected a WAV, FLAC, MP3 or OGG file, could not decode {name}: {exc}"
        ) from exc
    return samples, int(rate)


def _to_mono(samples: np.ndarray, name: str) -> np.ndarray:
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"expected audio shaped (samples,) or (samples, channels), got {samples.shape} for {name}")
    # (samples, channels) is soundfile's layout; accept (channels, samples) for small channel counts
    if samples.shape[0] <= 8 < samples.shape[1]:
        samples = samples.T
    return samples.mean(axis=1)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Resample (N,) float32 from `rate` Hz to `target` Hz as transformers' `load_audio` does: soxr
    "soxr_hq", then zero-padded or trimmed to ceil(N * target / rate) samples."""
    if rate == target:
        return samples
    import soxr

    n = math.ceil(samples.shape[0] * target / rate)
    out = soxr.resample(samples, rate, target, quality="soxr_hq")
    return np.pad(out, (0, max(0, n - out.shape[0])))[:n].astype(np.float32, copy=False)


def load_audio(source, sampling_rate: int | None = None, *, allow_urls: bool = False) -> Audio:
    """Decode `source` into 16 kHz mono float32 samples, truncated to 10 minutes with a warning.

    source: a path (str/Path) to a WAV/FLAC/MP3/OGG file, the file's bytes, or a numpy array /
    torch tensor of samples at `sampling_rate` Hz (default 16 kHz), shaped (N,) or (N, channels).
    """
    name = _describe(source)
    if isinstance(source, str) and "://" in source:
        if not allow_urls:
            raise AudioError(f"expected a local path, bytes or an array, got a URL {source!r} (URLs are refused)")
        import urllib.request

        with urllib.request.urlopen(source) as resp:  # opt-in only
            source = resp.read()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"expected an audio file, no such file: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"expected audio, got an empty file: {path}")
        samples, rate = _decode_file(str(path), name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError("expected audio bytes, got 0 bytes")
        samples, rate = _decode_file(io.BytesIO(bytes(source)), name)
    elif isinstance(source, np.ndarray) or type(source).__module__.startswith("torch"):
        arr = source.detach().cpu().numpy() if hasattr(source, "detach") else source
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise AudioError(f"expected a float or integer sample array, got dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
        samples, rate = arr.astype(np.float32, copy=False), int(sampling_rate or SAMPLE_RATE)
    else:
        raise AudioError(
            f"expected a path, bytes, a numpy array or a torch tensor, got {type(source).__name__}"
        )
    samples = _to_mono(np.asarray(samples, dtype=np.float32), name)
    if samples.shape[0] == 0:
        raise AudioError(f"expected at least one sample, got zero-length audio from {name}")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(f"expected finite samples, got {bad} NaN/Inf samples in {name}")
    samples = resample(samples, rate)
    original_seconds = samples.shape[0] / SAMPLE_RATE
    truncated = samples.shape[0] > MAX_AUDIO_SAMPLES
    if truncated:
        msg = f"audio {name} lasts {original_seconds:.1f} s; truncating to the first {MAX_AUDIO_SECONDS} s"
        warnings.warn(msg, AudioTruncatedWarning, stacklevel=2)
        logger.warning(msg)
        samples = samples[:MAX_AUDIO_SAMPLES]
    return Audio(np.ascontiguousarray(samples), name, truncated, original_seconds)


def split_windows(samples: np.ndarray) -> list[np.ndarray]:
    """Cut (N,) samples into consecutive 30 s windows; the last may be partial. At least one window."""
    n = samples.shape[0]
    count = max(1, -(-n // WINDOW_SAMPLES))
    return [samples[i * WINDOW_SAMPLES : min((i + 1) * WINDOW_SAMPLES, n)] for i in range(count)]
