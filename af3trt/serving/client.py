"""Client helper for an af3trt Triton repository: audio file bytes + prompt in, text out.

    client = Af3Client(http_url="127.0.0.1:8000", grpc_url="127.0.0.1:8001")
    text = client.generate("Transcribe the input speech.", audio="speech.wav")   # HTTP generate
    for piece in client.stream("Describe the audio.", audio=wav_bytes):         # gRPC streaming
        print(piece, end="", flush=True)
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "audio", "audio": "speech.wav"}, {"type": "text", "text": "Who?"}]}]
    text = client.infer(conversation=conv, stop=["\n"])                         # CONVERSATION + AUDIO

Audio is sent as the bytes of encoded files (WAV/FLAC/MP3/OGG): a local path is read here, on the
client, never passed to the server; a numpy array (16 kHz mono float) is encoded as WAV first.
Over HTTP the generate endpoint takes JSON, so the files travel base64-encoded in AUDIO_BASE64; over
gRPC they travel as raw BYTES in AUDIO. Works against `af3` (default) and `ensemble`. The server's
WARNINGS for a request (audio truncated to 10 minutes, a file that decoded short) become
`ServerWarning`s (Python warnings) here.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import urllib.error
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from ..build.triton_spec import OPTION_INPUTS, REQUEST_INPUTS, numpy_dtype
from ..errors import OptionError
from ..prompt import audio_references
from ..spec import SAMPLE_RATE

DEFAULT_MODEL = "af3"
# keyword -> (input name, numpy dtype, Triton dtype)
def _param(t) -> tuple[str, type, str]:
    """(input name, numpy scalar type, tritonclient dtype name) of a request input's TensorSpec."""
    name = numpy_dtype(t.dtype)
    return t.name, (np.object_ if name == "bytes" else np.dtype(name).type), \
        ("BYTES" if t.dtype == "TYPE_STRING" else t.dtype.removeprefix("TYPE_"))


# generation keyword -> its request input: the repository's own table (triton_spec.OPTION_INPUTS), plus STRIP_PREFIX
PARAMS = {t.name.lower(): _param(t) for t in REQUEST_INPUTS if t.name in OPTION_INPUTS or t.name == "STRIP_PREFIX"}


class RequestFailed(RuntimeError):
    """The server answered with an error; the message is Triton's (it names what was wrong). status: the
    gRPC status name where known ("StatusCode.INVALID_ARGUMENT", "StatusCode.UNAVAILABLE", ...)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class ServerWarning(UserWarning):
    """The server's WARNINGS for a request (e.g. audio truncated to 10 minutes), raised as warnings."""


def _warn(notes) -> None:
    """WARNINGS: a numpy array (gRPC), a list or, for one element, a string (HTTP generate JSON)."""
    if notes is None:
        return
    for note in [notes] if isinstance(notes, str) else notes:
        warnings.warn(note.decode("utf-8") if isinstance(note, bytes) else str(note), ServerWarning, stacklevel=3)


def audio_bytes(audio) -> list[bytes]:
    """None | bytes | path | (N,) float array at 16 kHz | a list of those -> encoded file bytes, in order."""
    if audio is None:
        return []
    if isinstance(audio, (list, tuple)):
        return [b for a in audio for b in audio_bytes(a)]
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return [bytes(audio)]
    if isinstance(audio, (str, os.PathLike)):
        if "://" in str(audio):
            raise OptionError(f"expected audio bytes, a local file or an array, got a URL {audio!r}")
        return [Path(audio).read_bytes()]
    if isinstance(audio, np.ndarray):
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.asarray(audio, np.float32), SAMPLE_RATE, format="WAV", subtype="FLOAT")
        return [buf.getvalue()]
    raise TypeError(f"expected audio as bytes, a path, a numpy array or a list of them, got {type(audio).__name__}")


def _text_input(prompt, audio, conversation) -> tuple[dict, list[bytes]]:
    """({"PROMPT": text} or {"CONVERSATION": JSON}, the AUDIO files): the request's two forms."""
    if conversation is None:
        if prompt is None:
            raise TypeError("expected a prompt or a conversation, got neither")
        return {"PROMPT": prompt}, audio_bytes(audio)
    if prompt is not None or audio is not None:
        raise TypeError("expected a conversation (its audios inside it) or a prompt + audio, got both")
    messages, sources = audio_references(conversation)
    return {"CONVERSATION": json.dumps(messages)}, [b for s in sources for b in audio_bytes(s)]


def _check_params(params: dict) -> None:
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise TypeError(f"expected generation keywords among {sorted(PARAMS)}, got {unknown}")


class Af3Client:
    """HTTP generate and gRPC (streaming) requests to an af3trt Triton server."""

    def __init__(self, http_url: str = "127.0.0.1:8000", grpc_url: str = "127.0.0.1:8001",
                 model: str = DEFAULT_MODEL, timeout_s: float = 600.0):
        self.http_url, self.grpc_url, self.model, self.timeout_s = http_url, grpc_url, model, timeout_s

    # -- HTTP -----------------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, audio=None, *, conversation=None, model: str | None = None,
                 **params) -> str:
        """POST /v2/models/{model}/generate (JSON; audio base64 in AUDIO_BASE64) -> the answer's text.
        `conversation` (messages as `Pipeline.generate` takes them) instead of prompt + audio."""
        _check_params(params)
        text, files = _text_input(prompt, audio, conversation)
        body = {**text, **{PARAMS[k][0]: ([v] if k == "stop" and isinstance(v, str) else v)
                           for k, v in params.items() if v is not None}}
        if files:
            body["AUDIO_BASE64"] = [base64.b64encode(f).decode("ascii") for f in files]
        url = f"http://{self.http_url}/v2/models/{model or self.model}/generate"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                out = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode(errors="replace")
            try:
                message = json.loads(raw).get("error", raw)
            except ValueError:
                message = raw
            raise RequestFailed(f"HTTP {exc.code}: {message}") from None
        _warn(out.get("WARNINGS"))
        text = out["TEXT"]
        return "".join(text) if isinstance(text, list) else text

    # -- gRPC -----------------------------------------------------------------------------------
    def inputs(self, prompt: str | None = None, audio=None, stream: bool = False, *, conversation=None, **params):
        """The gRPC InferInput list of a request (raw audio bytes in AUDIO): PROMPT + audio, or
        `conversation` (CONVERSATION, its audios in AUDIO)."""
        import tritonclient.grpc as grpcclient

        _check_params(params)
        text, files = _text_input(prompt, audio, conversation)
        (key, value), = text.items()
        tensors = [(key, np.array([value.encode("utf-8")], dtype=np.object_), "BYTES"),
                   ("STREAM", np.array([stream]), "BOOL")]
        if files:
            tensors.append(("AUDIO", np.array(files, dtype=np.object_), "BYTES"))
        for key, value in params.items():
            if value is not None:
                name, dtype, triton = PARAMS[key]
                if key == "stop":
                    value = [s.encode("utf-8") for s in ([value] if isinstance(value, str) else value)]
                    tensors.append((name, np.array(value, dtype=np.object_), triton))
                else:
                    tensors.append((name, np.array([value], dtype=dtype), triton))
        out = []
        for name, array, triton in tensors:
            t = grpcclient.InferInput(name, list(array.shape), triton)
            t.set_data_from_numpy(array)
            out.append(t)
        return out

    def stream(self, prompt: str | None = None, audio=None, *, conversation=None, model: str | None = None,
               **params) -> Iterator[str]:
        """Yield the answer's text pieces as the server streams them (gRPC, STREAM=true)."""
        yield from self.stream_inputs(self.inputs(prompt, audio, stream=True, conversation=conversation, **params),
                                      model=model)

    def infer(self, prompt: str | None = None, audio=None, *, conversation=None, model: str | None = None,
              **params) -> str:
        """One whole answer over gRPC (STREAM=false; works for decoupled and plain models)."""
        return "".join(self.stream_inputs(self.inputs(prompt, audio, stream=False, conversation=conversation,
                                                      **params), model=model))

    def stream_inputs(self, inputs, *, model: str | None = None) -> Iterator[str]:
        """Send prepared InferInputs on a gRPC stream; yield TEXT pieces until the final response
        (WARNINGS raised as ServerWarning). Closing the iterator early cancels the request (`responses`)."""
        for result in self.responses(inputs, model=model):
            _warn(result.as_numpy("WARNINGS"))
            text = result.as_numpy("TEXT")
            if text is not None:
                for piece in text.reshape(-1):
                    yield piece.decode("utf-8") if isinstance(piece, bytes) else str(piece)

    def responses(self, inputs, *, model: str | None = None) -> Iterator:
        """Send prepared InferInputs on a gRPC stream; yield each response (`tritonclient.grpc.InferResult`)
        until the final one. An error response raises RequestFailed (with its gRPC status).

        Closing the iterator early (`close()`, `break` out of a for loop, garbage collection) cancels
        the gRPC stream, and with it the request on the server."""
        import tritonclient.grpc as grpcclient

        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.grpc_url)
        client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=self.timeout_s)
        finished = False
        try:
            client.async_stream_infer(model or self.model, inputs, request_id=uuid.uuid4().hex,
                                      enable_empty_final_response=True)
            while True:
                try:
                    result, error = results.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise RequestFailed(f"expected a response within {self.timeout_s:.0f} s, got none") from None
                if error is not None:  # an error response ends its request: nothing left to cancel
                    finished = True
                    raise RequestFailed(error.message() if hasattr(error, "message") else str(error),
                                        error.status() if hasattr(error, "status") else None)
                final = result.get_response().parameters.get("triton_final_response")
                finished = final is not None and final.bool_param  # before yielding: the caller may stop there
                if result.get_response().outputs:
                    yield result
                if finished:
                    return
        finally:  # closed early (or failed): cancel the request on the server rather than wait for its end
            client.stop_stream(cancel_requests=not finished)
            client.close()
