"""Audio decoding and windowing: path, bytes or array -> 16 kHz mono float32 -> 30 s windows.

WAV, FLAC, MP3 and OGG are decoded with libsndfile (soundfile), channels averaged, then resampled with
soxr HQ and padded/trimmed to ceil(n * 16000 / rate) samples: transformers' `load_audio` (soundfile
backend, = `librosa.load`), so the same file gives the reference's samples.
URLs are refused: audio comes as files, bytes or arrays (no network access at run time). A caller
that opts in (`allow_urls=True`) may pass an http(s) URL: fetched with a timeout and a size cap
(`fetch_url`); every other scheme (file://, ftp://, data:...) is refused, redirects included.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .spec import MAX_AUDIO_SAMPLES, MAX_AUDIO_SECONDS, SAMPLE_RATE, WINDOW_SAMPLES

URL_SCHEMES = ("http", "https")
URL_MAX_BYTES = 128 * 2**20  # 128 MiB: 10 min of 48 kHz stereo 16-bit WAV is 110 MiB
URL_TIMEOUT_S = 30.0  # for the whole download, not only each read


class AudioError(UserError):
    """Raised for audio that cannot be used: unreadable, not audio, empty, NaN/Inf, wrong type."""


class AudioTruncatedWarning(UserWarning):
    """Audio longer than MAX_AUDIO_SECONDS was cut to its first MAX_AUDIO_SECONDS."""


class AudioIncompleteWarning(UserWarning):
    """The file decoded to less audio than its header declares (truncated or damaged)."""


@dataclass(frozen=True)
class Audio:
    """Decoded audio: `samples` (N,) float32 mono at 16 kHz; `source` names where it came from."""

    samples: np.ndarray
    source: str
    truncated: bool = False
    original_seconds: float = 0.0
    warnings: tuple[str, ...] = ()  # what was said about it (truncation, an incomplete file), for responses

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


# libsndfile's reason for data it cannot open although the file exists (a damaged or too short file)
_NOT_A_FILE = "File does not exist or is not a regular file"


def _decode_file(data, name: str) -> tuple[np.ndarray, int, int]:
    """(samples (N, C) float32, rate Hz, frames the file's header declares)."""
    import soundfile as sf

    try:
        with sf.SoundFile(data) as f:
            declared = int(f.frames)
            samples = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError by format
        reason = getattr(exc, "error_string", None) or str(exc)  # without the repr of our BytesIO
        if reason.startswith(_NOT_A_FILE):
            reason = "not a readable audio stream (damaged, or too short to hold one)"
        raise AudioError(f"expected a WAV, FLAC, MP3 or OGG file, could not decode {name}: {reason}") from exc
    return samples, int(rate), declared


def _check_complete(decoded: int, declared: int, rate: int, name: str) -> str | None:
    """A warning when the decoder stopped well before the length the header declares (a truncated file)."""
    if declared <= 0 or declared - decoded <= max(0.01 * declared, 0.1 * rate):
        return None
    msg = (f"audio {name}: decoded {decoded / rate:.2f} s of the {declared / rate:.2f} s its header declares "
           f"(a truncated or damaged file?); using what was decoded")
    warnings.warn(msg, AudioIncompleteWarning, stacklevel=3)
    return msg


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


def _check_scheme(url: str, what: str = "URL") -> None:
    from urllib.parse import urlsplit

    scheme = urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise AudioError(f"expected an {'/'.join(URL_SCHEMES)} {what}, got scheme {scheme!r} in {url!r}")


def fetch_url(url: str, *, max_bytes: int = URL_MAX_BYTES, timeout_s: float = URL_TIMEOUT_S) -> bytes:
    """GET an http(s) URL's body: at most `max_bytes`, within `timeout_s` in all; a redirect must stay
    http(s). Refusals and failures are AudioErrors naming the URL."""
    import time
    import urllib.error
    import urllib.request

    _check_scheme(url)

    class Redirects(urllib.request.HTTPRedirectHandler):  # urllib itself would follow one to ftp://
        def http_error_302(self, req, fp, code, msg, headers):
            from urllib.parse import urljoin

            target = headers.get("Location") or headers.get("URI") or ""
            _check_scheme(urljoin(req.full_url, target), f"redirect target (from {url})")
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    opener = urllib.request.build_opener(Redirects)
    deadline = time.monotonic() + timeout_s
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise AudioError(f"expected at most {max_bytes} bytes from {url}, got Content-Length {length}")
            chunks, size = [], 0
            while chunk := resp.read(min(1 << 20, max_bytes + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise AudioError(f"expected at most {max_bytes} bytes from {url}, got more")
                if time.monotonic() > deadline:
                    raise AudioError(f"expected {url} within {timeout_s:g} s, got {size} bytes by then")
    except urllib.error.HTTPError as exc:
        raise AudioError(f"expected audio from {url}, got HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:  # refused connection, DNS, timeout (socket.timeout)
        reason = getattr(exc, "reason", exc)
        raise AudioError(f"expected audio from {url}, could not fetch it: {reason}") from None
    return b"".join(chunks)


def load_audio(source, sampling_rate: int | None = None, *, allow_urls: bool = False) -> Audio:
    """Decode `source` into 16 kHz mono float32 samples, truncated to 10 minutes with a warning.

    source: a path (str/Path) to a WAV/FLAC/MP3/OGG file, the file's bytes, or a numpy array /
    torch tensor of samples at `sampling_rate` Hz (default 16 kHz), shaped (N,) or (N, channels).
    """
    name = _describe(source)
    if isinstance(source, str) and "://" in source:
        if not allow_urls:
            raise AudioError(f"expected a local path, bytes or an array, got a URL {source!r} (URLs are refused "
                             f"unless the caller opts in with allow_urls=True)")
        source = fetch_url(source)
    notes, declared = [], 0
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise AudioError(f"expected an audio file, got a directory: {path}")
        if not path.is_file():
            raise AudioError(f"expected an audio file, no such file: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"expected audio, got an empty file: {path}")
        samples, rate, declared = _decode_file(str(path), name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError("expected audio bytes, got 0 bytes")
        samples, rate, declared = _decode_file(io.BytesIO(bytes(source)), name)
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
    if declared and (note := _check_complete(samples.shape[0], declared, rate, name)):
        notes.append(note)
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
        notes.append(msg)
        samples = samples[:MAX_AUDIO_SAMPLES]
    return Audio(np.ascontiguousarray(samples), name, truncated, original_seconds, tuple(notes))


def audio_warnings(audios) -> list[str]:
    """What was done to a request's audios, one line each: "AUDIO[i]: <what>" (i: the audio's index in the
    request, in prompt order for a conversation). The one form of `Result.warnings`, `af3`'s and the
    ensemble's WARNINGS and the OpenAI API's `af3trt.warnings`."""
    return [f"AUDIO[{i}]: {w}" for i, a in enumerate(audios) for w in a.warnings]


def split_windows(samples: np.ndarray) -> list[np.ndarray]:
    """Cut (N,) samples into consecutive 30 s windows; the last may be partial. At least one window."""
    n = samples.shape[0]
    count = max(1, -(-n // WINDOW_SAMPLES))
    return [samples[i * WINDOW_SAMPLES : min((i + 1) * WINDOW_SAMPLES, n)] for i in range(count)]


def synthetic_audio(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Deterministic speech-like test signal: (N,) float32, noise under a slow syllable envelope
    plus a gliding harmonic voice, for tests, calibration defaults and benchmarks."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, np.pi))  # ~3 syllables/s
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    return (envelope * (0.08 * voice + 0.03 * rng.standard_normal(n))).astype(np.float32)
