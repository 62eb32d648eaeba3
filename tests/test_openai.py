"""`af3trt openai` on 127.0.0.1, driven by the official `openai` client: every answer equals
`Pipeline.generate` for the same conversation; bad input gets its status and OpenAI's error shape.

Each test runs in both modes: in-process (`InProcess` on the tiny engine dir) and `--triton-url`
(`TritonBackend` forwarding to `af3` on the session's real tritonserver, which serves the CPU
repository of the same engine dir; marked triton_server). The heavier duplicates of the Triton mode
are `slow` (scripts/test.sh -m slow, as CI runs it)."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from af3trt.assets import SPEECH_WAV
from af3trt.audio import synthetic_audio

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MODEL = "af3-tiny"
MAX = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, backend, **options):
        import uvicorn

        from af3trt.serving.openai_server import ServerOptions, create_app

        self.port = _free_port()
        app = create_app(backend, ServerOptions(served_model_name=MODEL, **options))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the OpenAI server did not start within 30 s")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _modes(*rest, slow_on_triton=False):
    """pytest params of the two modes (`rest`: the test's other parameters)."""
    marks = [pytest.mark.triton_server] + ([pytest.mark.slow] if slow_on_triton else [])
    return [pytest.param("in-process", *rest), pytest.param("triton", *rest, marks=marks)]


BOTH = pytest.mark.parametrize("mode", _modes(), indirect=True, scope="module")
BOTH_SLOW = pytest.mark.parametrize("mode", _modes(slow_on_triton=True), indirect=True, scope="module")


@pytest.fixture(scope="module")
def mode(request):
    return request.param


def _backend(mode, engine_pipe, request):
    from af3trt.serving.openai_server import InProcess

    if mode == "in-process":
        return InProcess(engine_pipe)
    from af3trt.serving.openai_triton import TritonBackend

    return TritonBackend(request.getfixturevalue("server").grpc_url, timeout_s=120)


@pytest.fixture(scope="module")
def api(mode, engine_pipe, request):
    s = Server(_backend(mode, engine_pipe, request))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small(mode, engine_pipe, request):
    """A server with a 1 MB body limit and one request slot."""
    s = Server(_backend(mode, engine_pipe, request), max_body_bytes=1024 * 1024, max_queue=1)
    yield s
    s.stop()


def wav_b64(samples, rate=16000) -> str:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


def audio_part(samples) -> dict:
    return {"type": "input_audio", "input_audio": {"data": wav_b64(samples), "format": "wav"}}


def pipe_answer(pipe, conv, **kw):
    return pipe.generate(conv, do_sample=False, max_new_tokens=MAX, **kw)[0]


@BOTH
def test_chat_with_one_and_two_audios_equals_the_pipeline(api, engine_pipe):
    a, b = synthetic_audio(2.5, 31), synthetic_audio(4.0, 32)
    for audios in ([a], [a, b]):
        messages = [{"role": "user", "content": [audio_part(x) for x in audios] + [{"type": "text", "text": "Compare."}]}]
        got = api.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX)
        conv = [{"role": "user", "content": [{"type": "audio", "audio": x} for x in audios] +
                 [{"type": "text", "text": "Compare."}]}]
        want = pipe_answer(engine_pipe, conv)
        print(len(audios), "audios:", repr(got.choices[0].message.content), "usage", got.usage)
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == len(want.token_ids)
        assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")


@BOTH
def test_multi_turn_and_system(api, engine_pipe):
    a = synthetic_audio(3.0, 33)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [audio_part(a), {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A voice."},
                {"role": "user", "content": "Say more."}]
    got = api.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX)
    conv = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "audio", "audio": a}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A voice."}, {"role": "user", "content": "Say more."}]
    assert got.choices[0].message.content == pipe_answer(engine_pipe, conv).text


@BOTH
def test_streaming_joins_to_the_answer_with_usage(api, engine_pipe):
    messages = [{"role": "user", "content": [audio_part(synthetic_audio(2.0, 34)), {"type": "text", "text": "Hi"}]}]
    whole = api.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX)
    chunks = list(api.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX,
                                                     stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    print(f"{len(chunks)} chunks: {text!r}")
    assert text == whole.choices[0].message.content and reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens and not chunks[-1].choices


@BOTH_SLOW
def test_audio_url_data_uri(api, engine_pipe):
    x = synthetic_audio(2.0, 35)
    part = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + wav_b64(x)}}
    got = api.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [part]}],
                                             temperature=0, max_tokens=MAX)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": x}]}]
    assert got.choices[0].message.content == pipe_answer(engine_pipe, conv).text


@pytest.mark.parametrize("mode, fmt", [p for f in ("json", "text", "verbose_json")
                                       for p in _modes(f, slow_on_triton=f != "json")], indirect=["mode"], scope="module")
def test_transcriptions_every_format(api, engine_pipe, fmt):
    with open(SPEECH_WAV, "rb") as f:
        got = api.client.audio.transcriptions.create(model=MODEL, file=f, response_format=fmt, temperature=0,
                                                     extra_body={})
    want = engine_pipe.transcribe(str(SPEECH_WAV), do_sample=False)
    text = got if isinstance(got, str) else got.text
    print(fmt, repr(text))
    assert text.strip() == want.strip()
    if fmt == "verbose_json":
        assert abs(got.duration - 5.8) < 0.2


def _truncated_mp3() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.sin(np.arange(5 * 16_000) / 20).astype(np.float32) * 0.3, 16_000, format="MP3")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@BOTH
def test_audio_warnings_in_the_af3trt_extension(api, engine_pipe):
    """What was done to the audio (here: an MP3 that decodes short) comes under the body's `af3trt` key,
    worded as Result.warnings; streamed, in the chunk that carries finish_reason."""
    mp3 = _truncated_mp3()
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(mp3).decode(), "format": "mp3"}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}]
    want = pipe_answer(engine_pipe, [{"role": "user", "content": [{"type": "audio", "audio": mp3},
                                                                  {"type": "text", "text": "Hi"}]}])
    got = api.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX)
    print(got.model_extra["af3trt"], want.warnings)
    assert len(want.warnings) == 1 and "its header declares" in want.warnings[0]
    assert got.model_extra["af3trt"] == {"warnings": want.warnings} and got.choices[0].message.content == want.text
    chunks = list(api.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX,
                                                     stream=True))
    ends = [c.model_extra.get("af3trt") for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == [{"warnings": want.warnings}]
    clean = api.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=2)
    assert clean.model_extra["af3trt"] == {"warnings": []}


@BOTH
def test_models_and_health(api):
    listed = api.client.models.list().data
    assert [m.id for m in listed] == [MODEL]
    assert json.loads(urllib.request.urlopen(api.url + "/health").read()) == {"status": "ok"}


def _post(url, body, status):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=120)
    except urllib.error.HTTPError as exc:
        err = json.loads(exc.read())
        print(status, err)
        assert exc.code == status and set(err["error"]) == {"message", "type", "param", "code"}
        return err["error"]
    raise AssertionError(f"expected HTTP {status}, got 200")


def chat_body(content, **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **kw}


@BOTH
def test_bad_input_statuses_and_error_shape(api):
    nan = np.full(1600, np.nan, np.float32)
    not_audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"no audio here" * 9).decode(),
                                                        "format": "wav"}}
    empty = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    cases = [
        (chat_body([not_audio]), 400, "WAV, FLAC, MP3 or OGG"),
        (chat_body([empty]), 400, "audio bytes"),
        (chat_body([audio_part(nan)]), 400, "NaN"),
        (chat_body("hello " * 20000), 400, "at most"),
        (chat_body("hi", n=2), 400, "n=1"),
        (chat_body("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
        (chat_body("hi", logprobs=True), 400, "logprobs"),
        (chat_body("hi", frobnicate=1), 400, "frobnicate"),
        (chat_body("hi", top_p=0.5), 400, "=True with {"),  # (do_sample | DO_SAMPLE)=True with {top_p: 0.5}
        (chat_body("hi", temperature=-1), 400, "temperature"),
        (chat_body("hi", max_tokens=100000), 400, "at most 512"),  # (max_new_tokens | MAX_TOKENS), got 100000
        (chat_body([{"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}]), 400, "scheme 'file'"),
        (chat_body([{"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:9/a.wav"}}]), 400, "--allow-urls"),
        ({**chat_body("hi"), "model": "other"}, 404, "expected model"),
        (chat_body([{"type": "image_url", "image_url": {"url": "x"}}]), 400,
         "expected a content part of type 'text', 'input_audio' or 'audio_url', got 'image_url'"),
        (chat_body([{"type": "input_audio", "input_audio": {"data": "eA==", "format": "aac"}}]), 400,
         "expected input_audio.format in ['wav', 'mp3', 'flac', 'ogg'], got 'aac'"),
    ]
    for body, status, text in cases:
        err = _post(api.url, body, status)
        assert text in err["message"], err
    req = urllib.request.Request(api.url + "/v1/chat/completions", data=b"not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req, timeout=60)
    assert bad.value.code == 400 and "expected a JSON object as the request body" in json.loads(bad.value.read())["error"]["message"]
    assert api.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              temperature=0, max_tokens=2).choices


@BOTH_SLOW
def test_body_limit_413(small):
    """By Content-Length, before the body is sent; and while a chunked body (no length) arrives."""
    import http.client

    big = json.dumps(chat_body([{"type": "input_audio", "input_audio": {
        "data": wav_b64(synthetic_audio(40.0, 1)), "format": "wav"}}])).encode()
    conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(big)))
    conn.endheaders()
    resp = conn.getresponse()
    err = json.loads(resp.read())["error"]
    print(resp.status, err)
    assert resp.status == 413 and "at most 1048576 bytes" in err["message"] and err["code"] == "request_too_large"
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    err = json.loads(resp.read())["error"]
    print(resp.status, err)
    assert resp.status == 413 and "chunked" in err["message"]
    conn.close()


@BOTH_SLOW
def test_concurrent_clients_with_bad_requests_among_them(api, engine_pipe):
    clips = [synthetic_audio(1.0 + k * 0.5, 40 + k) for k in range(4)]
    want = [pipe_answer(engine_pipe, [{"role": "user", "content": [{"type": "audio", "audio": c}]}]).text for c in clips]
    out, errors = {}, []

    def client(w):
        for k in range(4):
            if (w + k) % 3 == 0:  # a bad one among them
                try:
                    api.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)
                    errors.append("a bad request was answered")
                except openai.BadRequestError:
                    pass
                continue
            r = api.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [audio_part(clips[k])]}],
                                                   temperature=0, max_tokens=MAX)
            out[(w, k)] = r.choices[0].message.content

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and out and all(text == want[k] for (w, k), text in out.items())


@BOTH
def test_disconnected_stream_frees_its_slot(small, engine_pipe):
    """max_queue 1: while the abandoned stream still ran, every other request would get 503."""
    clip = synthetic_audio(2.0, 50)
    messages = [{"role": "user", "content": [audio_part(clip)]}]
    stream = small.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=500,
                                                  stream=True, extra_body={"ignore_eos": True})
    t0 = time.perf_counter()
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()
    deadline = time.perf_counter() + 20
    while True:
        try:
            r = small.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     temperature=0, max_tokens=2)
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 503, exc
            assert time.perf_counter() < deadline, "the abandoned stream kept its slot"
            time.sleep(0.1)
    freed = time.perf_counter() - t0
    full = engine_pipe.generate([{"role": "user", "content": [{"type": "audio", "audio": clip}]}],
                                do_sample=False, max_new_tokens=60, ignore_eos=True)[0]
    per_token = full.timings["decode"] / 59
    print(f"slot free {freed:.2f} s after closing; 500 tokens would take ~{500 * per_token:.1f} s")
    assert r.choices and freed < 500 * per_token / 2


@BOTH
def test_stop_penalties_and_extensions_equal_the_pipeline(api, engine_pipe):
    """stop, presence/frequency penalties and the extensions (repetition_penalty, ignore_eos, min_tokens)
    travel to the backend (in --triton-url mode: as af3's request inputs) and give Pipeline.generate's answer."""
    x = synthetic_audio(2.0, 36)
    messages = [{"role": "user", "content": [audio_part(x), {"type": "text", "text": "Describe."}]}]
    conv = [{"role": "user", "content": [{"type": "audio", "audio": x}, {"type": "text", "text": "Describe."}]}]
    pens = dict(presence_penalty=0.5, frequency_penalty=0.25)
    free = engine_pipe.generate(conv, do_sample=False, max_new_tokens=24, repetition_penalty=1.1, **pens)[0]
    stop = free.text[len(free.text) // 2:][:2]
    assert stop.strip(), free.text
    cases = [(dict(stop=[stop]), dict(stop=[stop])),
             (dict(extra_body={"ignore_eos": True, "min_tokens": 20}), dict(ignore_eos=True, min_new_tokens=20))]
    for sent, opts in cases:
        want = engine_pipe.generate(conv, do_sample=False, max_new_tokens=24, repetition_penalty=1.1, **pens, **opts)[0]
        extra = {"repetition_penalty": 1.1, **sent.pop("extra_body", {})}
        kw = dict(model=MODEL, messages=messages, temperature=0, max_tokens=24, extra_body=extra, **pens, **sent)
        got = api.client.chat.completions.create(**kw)
        chunks = list(api.client.chat.completions.create(**kw, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        print(opts, repr(got.choices[0].message.content), "| want", repr(want.text), want.finish_reason)
        assert got.choices[0].message.content == streamed == want.text
        assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
        assert got.usage.completion_tokens == len(want.token_ids)
        assert "stop" not in opts or want.finish_reason == "stop_string"
    assert want.finish_reason == "length" and len(want.token_ids) == 24  # ignore_eos: the whole max_tokens


def test_triton_backend_maps_errors(monkeypatch):
    """What the repository refuses is a 400 with its message; an af3trt internal error a 500 without
    details for the client; an unreachable server a 503."""
    from af3trt.errors import UserError
    from af3trt.serving.client import RequestFailed
    from af3trt.serving.openai_schema import ApiError
    from af3trt.serving.openai_triton import TritonBackend

    backend = object.__new__(TritonBackend)
    backend.url, backend.model, backend.allow_urls = "127.0.0.1:1", "af3", False
    from af3trt.serving.openai_triton import _option_keywords

    backend.keywords = _option_keywords()

    class Failing:
        def __init__(self, exc):
            self.exc = exc

        def inputs(self, **kw):
            return []

        def responses(self, inputs, model):
            raise self.exc
            yield

    conv = [{"role": "user", "content": "hi"}]
    backend.client = Failing(RequestFailed("in preprocessing: expected at most 512 MAX_TOKENS, got 600"))
    with pytest.raises(UserError, match="expected at most 512 MAX_TOKENS"):
        backend.generate(conv, {"max_new_tokens": 600})
    backend.client = Failing(RequestFailed("in preprocessing: af3trt internal error (KeyError): 'x'"))
    with pytest.raises(RuntimeError, match="internal error"):
        backend.generate(conv, {})
    backend.client = Failing(RequestFailed("failed to connect", "StatusCode.UNAVAILABLE"))
    with pytest.raises(ApiError) as info:
        list(backend.stream(conv, {}))
    assert info.value.status == 503


def test_openai_command_line_modes(capsys):
    """Exactly one of --model / --triton-url; no in-process backend options with --triton-url; a Triton
    URL where nothing answers is one clear line, not a traceback."""
    from af3trt.cli import main

    free = f"127.0.0.1:{_free_port()}"
    for argv, message in [(["--model", "tiny", "--triton-url", free], "exactly one, got both"),
                          ([], "exactly one, got neither"),
                          (["--triton-url", free, "--decoder", "torch"], "expected no in-process backend options"),
                          (["--triton-url", free], f"expected an af3trt Triton server answering gRPC at {free}")]:
        assert main(["openai", *argv]) == 2
        err = capsys.readouterr().err
        print(err)
        assert err.startswith("af3trt openai: error: ") and message in err and "Traceback" not in err
