import io
import warnings

import numpy as np
import pytest
import soundfile as sf

from af3trt.assets import SPEECH_WAV
from af3trt.audio import AudioError, AudioTruncatedWarning, load_audio, split_windows
from af3trt.spec import MAX_AUDIO_SAMPLES, SAMPLE_RATE, WINDOW_SAMPLES


def tone(rate: int, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234.5 * t)
            + 0.1 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)


def encode(samples, rate, fmt, subtype) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,rate,subtype,channels,max_err", [
    ("MP3", 44100, "MPEG_LAYER_III", 2, 0.05),  # lossy: codec error dominates
    ("FLAC", 22050, "PCM_16", 1, 1e-3),  # lossless: resampler (soxr HQ, as transformers) + 16-bit error only
    ("OGG", 48000, "VORBIS", 2, 0.05),
    ("WAV", 16000, "PCM_16", 1, 1e-4),
])
def test_formats_resample_to_16k_mono(fmt, rate, subtype, channels, max_err, tmp_path):
    ref = tone(SAMPLE_RATE)
    x = tone(rate)
    data = encode(np.stack([x] * channels, 1) if channels > 1 else x, rate, fmt, subtype)
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(data)
    for source in (path, str(path), data):
        audio = load_audio(source)
        assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
        assert abs(audio.samples.shape[0] - ref.shape[0]) <= 2
        n = min(audio.samples.shape[0], ref.shape[0])
        err = np.abs(audio.samples[500 : n - 500] - ref[500 : n - 500]).max()  # edges: filter transients
        print(f"{fmt} {rate} Hz x{channels}: max abs error vs 16 kHz reference {err:.2e} (budget {max_err})")
        assert err < max_err


def test_array_input_and_rate():
    x = tone(8000)
    audio = load_audio(x, sampling_rate=8000)
    assert audio.samples.shape[0] == 2 * SAMPLE_RATE
    stereo = np.stack([tone(16000), tone(16000)], 1)
    np.testing.assert_allclose(load_audio(stereo).samples, tone(16000), atol=1e-6)
    ints = (tone(16000) * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(ints).samples, tone(16000), atol=1e-4)
    import torch

    np.testing.assert_array_equal(load_audio(torch.from_numpy(tone(16000))).samples, tone(16000))


def test_bundled_clip():
    audio = load_audio(SPEECH_WAV)
    assert 5 < audio.seconds < 7 and np.abs(audio.samples).max() > 0.1


@pytest.mark.parametrize("source,needle", [
    (b"this is not audio at all" * 10, "could not decode"),
    (b"", "0 bytes"),
    (np.zeros(0, np.float32), "zero-length"),
    (np.array([0.0, np.nan, 0.1], np.float32), "NaN/Inf"),
    (np.array([0.0, np.inf], np.float32), "NaN/Inf"),
    (12345, "got int"),
    ({"audio": "x"}, "got dict"),
    (np.array(["a", "b"]), "dtype"),
    ("https://example.com/a.wav", "URLs are refused"),
    ("/nonexistent/clip.wav", "no such file"),
])
def test_bad_input_raises_audio_error(source, needle):
    with pytest.raises(AudioError, match=needle.replace("(", r"\(")) as info:
        load_audio(source)
    print(info.value)


def test_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        load_audio(empty)
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(AudioError, match="could not decode"):
        load_audio(bad)
    header_only = tmp_path / "zero.wav"
    header_only.write_bytes(encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"))
    with pytest.raises(AudioError, match="zero-length"):
        load_audio(header_only)


def test_over_long_audio_truncates_with_warning():
    x = np.zeros(MAX_AUDIO_SAMPLES + 5 * SAMPLE_RATE, np.float32)
    with pytest.warns(AudioTruncatedWarning, match="truncating to the first 600 s"):
        audio = load_audio(x)
    assert audio.truncated and audio.samples.shape[0] == MAX_AUDIO_SAMPLES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not load_audio(np.zeros(MAX_AUDIO_SAMPLES, np.float32)).truncated


def test_split_windows():
    assert [w.shape[0] for w in split_windows(np.zeros(WINDOW_SAMPLES * 2 + 7))] == [WINDOW_SAMPLES, WINDOW_SAMPLES, 7]
    assert [w.shape[0] for w in split_windows(np.zeros(WINDOW_SAMPLES))] == [WINDOW_SAMPLES]
    assert [w.shape[0] for w in split_windows(np.zeros(3))] == [3]
