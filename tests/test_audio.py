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


# ------------------------------------------------------------------------------ messages, URLs


def test_messages_name_the_input_not_internals(tmp_path):
    """No repr of af3trt's BytesIO, no libsndfile "does not exist" for a file that exists, a directory
    called a directory."""
    mp3 = encode(np.sin(np.arange(5 * SAMPLE_RATE) / 20).astype(np.float32) * 0.3, SAMPLE_RATE, "MP3", "MPEG_LAYER_III")
    short = tmp_path / "short.mp3"
    short.write_bytes(mp3[:200])
    for source, name in ((short, str(short)), (mp3[:200], "<200 bytes>"), (b"not audio" * 10, "<90 bytes>")):
        with pytest.raises(AudioError) as info:
            load_audio(source)
        print(info.value)
        assert f"could not decode {name}: " in str(info.value)
        assert "_io.BytesIO" not in str(info.value) and "does not exist" not in str(info.value)
    with pytest.raises(AudioError, match=f"expected an audio file, got a directory: {tmp_path}$"):
        load_audio(tmp_path)


def test_truncated_mp3_decodes_with_a_warning(recwarn):
    from af3trt.audio import AudioIncompleteWarning

    mp3 = encode(np.sin(np.arange(5 * SAMPLE_RATE) / 20).astype(np.float32) * 0.3, SAMPLE_RATE, "MP3", "MPEG_LAYER_III")
    whole = load_audio(mp3)
    assert whole.warnings == () and not [w for w in recwarn if issubclass(w.category, AudioIncompleteWarning)]
    with pytest.warns(AudioIncompleteWarning, match=r"decoded \d\.\d\d s of the 5\.00 s its header declares"):
        half = load_audio(mp3[: len(mp3) // 2])
    assert 1.0 < half.seconds < 4.0 and len(half.warnings) == 1 and "truncated" in half.warnings[0]


@pytest.fixture(scope="module")
def http_url():
    """A loopback HTTP server: /ok.wav (1 s), /big (Content-Length past the cap), /stream (no length,
    past the cap), /slow (answers after 3 s), /to-file (redirect to file://), /missing (404)."""
    import http.server
    import threading
    import time

    wav = encode(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE, "WAV", "PCM_16")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # no Content-Length needed: the body ends with the connection

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
                return
            if self.path == "/missing":
                self.send_error(404)
                return
            if self.path == "/slow":
                time.sleep(3)
            self.send_response(200)
            if self.path == "/big":
                self.send_header("Content-Length", str(10**9))
            elif self.path != "/stream":
                self.send_header("Content-Length", str(len(wav)))
            self.end_headers()
            if self.path == "/stream":
                for _ in range(64):
                    self.wfile.write(b"\0" * 4096)
            elif self.path != "/big":
                self.wfile.write(wav)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_opt_in_http_only_capped_and_timed(http_url, tmp_path):
    from af3trt.audio import fetch_url

    assert load_audio(f"{http_url}/ok.wav", allow_urls=True).seconds == pytest.approx(1.0)
    with pytest.raises(AudioError, match=r"got a URL .* \(URLs are refused unless the caller opts in"):
        load_audio(f"{http_url}/ok.wav")
    (tmp_path / "a.wav").write_bytes(encode(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE, "WAV", "PCM_16"))
    for url in (f"file://{tmp_path / 'a.wav'}", "ftp://127.0.0.1/a.wav", "gopher://127.0.0.1/a"):
        with pytest.raises(AudioError, match=r"expected an http/https URL, got scheme '\w+'"):
            load_audio(url, allow_urls=True)
    with pytest.raises(AudioError, match=r"expected an http/https redirect target .*, got scheme 'file'"):
        load_audio(f"{http_url}/to-file", allow_urls=True)
    with pytest.raises(AudioError, match=r"expected at most 1000 bytes from .*/big, got Content-Length 1000000000"):
        fetch_url(f"{http_url}/big", max_bytes=1000)
    with pytest.raises(AudioError, match=r"expected at most 100000 bytes from .*/stream, got more"):
        fetch_url(f"{http_url}/stream", max_bytes=100_000)
    assert len(fetch_url(f"{http_url}/stream")) == 64 * 4096
    with pytest.raises(AudioError, match=r"expected audio from .*/slow, could not fetch it: .*timed out"):
        fetch_url(f"{http_url}/slow", timeout_s=0.5)
    with pytest.raises(AudioError, match=r"expected audio from .*/missing, got HTTP 404"):
        load_audio(f"{http_url}/missing", allow_urls=True)
