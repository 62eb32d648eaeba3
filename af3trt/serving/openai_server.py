"""`af3trt openai`: an OpenAI-compatible HTTP API for AF3 (FastAPI + uvicorn, loopback by default).

    POST /v1/chat/completions      chat with any number of audios (input_audio / audio_url parts), streaming
    POST /v1/audio/transcriptions  multipart: file, model, prompt, response_format json|text|verbose_json, temperature
    GET  /v1/models                the served model, with its limits
    GET  /health

The pipeline runs in-process (`InProcess`: `Pipeline.from_pretrained(PATH)`, the best backends
available), or in a Triton server (`af3trt.serving.openai_triton.TritonBackend`: each request goes
to the repository's `af3` model over gRPC streaming; `serve(triton_url=...)`). Requests
run concurrently: a decoder that batches in flight (TensorRT-LLM) takes them all at once, the torch
decoders one batch at a time; at most `max_queue` requests wait or run, the next gets 503. A client
that disconnects mid-stream cancels its generation (the stream's producer stops between tokens and
closes the pipeline's generator, which frees the decoder). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; no stack trace reaches a client.
(No `from __future__ import annotations` here: FastAPI reads the route annotations at run time.)
"""


import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from ..audio import load_audio
from ..errors import OptionError, UserError
from ..prompt import DEFAULT_TRANSCRIBE_PROMPT, strip_transcription_prefix
from .openai_schema import Answer, ApiError, ChatRequest, TranscriptionForm, conversation, options, refuse_unsupported
from .openai_triton import TritonBackend

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 200 * 1024 * 1024  # 10 min of 48 kHz stereo 16-bit WAV is 115 MB, 154 MB in base64
DEFAULT_MAX_QUEUE = 64
WARNINGS_HEADER = "X-Af3trt-Warnings"  # a response_format=text transcription's warnings (JSON list)


def _user_errors() -> tuple[type, ...]:
    return (UserError,)


@dataclass
class ServerOptions:
    served_model_name: str = "af3"
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allow_urls: bool = False


class InProcess:
    """The pipeline in this process. `generate` / `stream` run in worker threads."""

    def __init__(self, pipe):
        self.pipe = pipe

    def info(self) -> dict:
        limits = {k: v for k, v in self.pipe.limits.items() if v is not None}  # the checked ones
        return {"backend": "in-process", "limits": limits, "encoder": type(self.pipe.encoder).__name__,
                "decoder": getattr(self.pipe.decoder, "name", type(self.pipe.decoder).__name__),
                "generation_defaults": {k: v for k, v in self.pipe.defaults.as_dict().items() if k != "stop"}}

    def generate(self, conv: list[dict], opts: dict) -> Answer:
        return Answer.from_result(self.pipe.generate(conv, **opts)[0])

    def stream(self, conv: list[dict], opts: dict):
        """Text pieces, then the Answer."""
        from ..runtime.pipeline import Result

        inner = self.pipe.stream_result(conv, **opts)
        try:
            for item in inner:
                yield Answer.from_result(item) if isinstance(item, Result) else item
        finally:  # closed early (the client left): the pipeline's generator frees the decoder now
            inner.close()


class _Slots:
    """At most `limit` requests waiting or running; past it, 503."""

    def __init__(self, limit: int):
        self.limit, self.used, self.lock = limit, 0, threading.Lock()

    def take(self) -> None:
        with self.lock:
            if self.used >= self.limit:
                raise ApiError(f"the server is busy: {self.used} requests waiting or running (limit {self.limit}); "
                               "retry later", status=503, kind="server_error", code="overloaded")
            self.used += 1

    def give(self) -> None:
        with self.lock:
            self.used -= 1


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _extension(answer: Answer) -> dict:
    """af3trt's extension key of a response body: what was done to the request's audio."""
    return {"warnings": answer.warnings}


def create_app(backend, opts: ServerOptions | None = None):
    """The FastAPI app serving `backend` (InProcess or openai_triton.TritonBackend)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    opts = opts or ServerOptions()
    app = FastAPI(title="af3trt OpenAI-compatible API", docs_url=None, redoc_url=None)
    slots = _Slots(opts.max_queue)
    user_errors = _user_errors()

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(_error_body(str(exc), exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        # the deepest error: for `content`, the list branch's part error, not "should be a string"
        first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
        loc = []  # the JSON path, without pydantic's union branches ("list[...]", "str", a tag before its field)
        for p in first.get("loc", ()):
            p = str(p)
            if p != "body" and "[" not in p and p not in ("str", "list") and (not loc or loc[-1] != p):
                loc.append(p)
        field = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            field, msg = None, f"expected a JSON object as the request body, got invalid JSON ({first.get('ctx', {}).get('error', msg)})"
        elif first.get("type") == "union_tag_invalid":
            msg = f"expected a content part of type 'text', 'input_audio' or 'audio_url', got {first.get('ctx', {}).get('tag')!r}"
        elif first.get("type") == "extra_forbidden":
            msg = f"unknown field {field!r}: not part of OpenAI's schema or af3trt's extensions"
        return JSONResponse(_error_body(f"{field}: {msg}" if field else msg, "invalid_request_error", field),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(_error_body(f"internal server error ({type(exc).__name__}); see the server log",
                                        "server_error"), status_code=500)

    app.add_middleware(_BodyLimit, limit=opts.max_body_bytes)

    def check_model(name: str) -> None:
        if name != opts.served_model_name:
            raise ApiError(f"expected model {opts.served_model_name!r}, got {name!r}", param="model", status=404,
                           code="model_not_found")

    def run_user(fn, *args):
        try:
            return fn(*args)
        except user_errors as exc:
            raise ApiError(str(exc)) from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": opts.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "af3trt", "af3trt": backend.info()}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        refuse_unsupported(req)
        conv = conversation(req, opts.allow_urls)
        gen_opts = options(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream_chat(backend, slots, conv, gen_opts, rid, created, opts.served_model_name,
                                      include_usage, request, user_errors)
        slots.take()
        try:
            result = await asyncio.to_thread(run_user, backend.generate, conv, gen_opts)
        finally:
            slots.give()
        return {"id": rid, "object": "chat.completion", "created": created, "model": opts.served_model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": _usage(result), "af3trt": _extension(result)}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError("expected a 'file' part holding the audio file, got none", param="file")
        fields = {k: v for k, v in form.multi_items() if k != "file"}
        try:
            spec = TranscriptionForm(**fields)
        except Exception as exc:  # pydantic ValidationError: name the field
            errors = getattr(exc, "errors", lambda: [])()
            field = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
            raise ApiError(f"{field}: {errors[0]['msg']}" if errors else str(exc), param=field) from None
        check_model(spec.model)
        data = await upload.read()
        if not data:
            raise ApiError("expected audio bytes in 'file', got an empty file", param="file")
        conv = [{"role": "user", "content": [{"type": "audio", "audio": data},
                                             {"type": "text", "text": spec.prompt or DEFAULT_TRANSCRIBE_PROMPT}]}]
        gen_opts = {} if spec.temperature is None else (
            {"do_sample": False} if spec.temperature == 0 else {"do_sample": True, "temperature": spec.temperature})
        slots.take()
        try:
            result = await asyncio.to_thread(run_user, backend.generate, conv, gen_opts)
        finally:
            slots.give()
        text = strip_transcription_prefix(result.text)
        if spec.response_format == "text":  # no body to extend: the warnings travel in a header
            return PlainTextResponse(text, headers={WARNINGS_HEADER: json.dumps(result.warnings)})
        if spec.response_format == "json":
            return {"text": text, "af3trt": _extension(result)}
        return {"task": "transcribe", "language": None, "duration": _duration(data), "text": text,
                "usage": {"type": "tokens", "input_tokens": result.prompt_tokens,
                          "output_tokens": result.completion_tokens,
                          "total_tokens": result.prompt_tokens + result.completion_tokens,
                          "audio_tokens": result.audio_tokens}, "af3trt": _extension(result)}

    return app


class _BodyLimit:
    """ASGI middleware: a body past `limit` bytes is a 413, by its Content-Length before anything is
    read, or while it arrives (chunked uploads: the body is read here, then handed to the app)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _reject(self, scope, receive, send, got: str):
        from fastapi.responses import JSONResponse

        body = _error_body(f"expected a request body of at most {self.limit} bytes, got {got}",
                           "invalid_request_error", None, "request_too_large")
        await JSONResponse(body, status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send, length.decode())
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await self._reject(scope, receive, send, f"more ({total} bytes so far, chunked)")
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the real channel: a disconnect reaches the app

        await self.app(scope, replay, send)


def _usage(answer: Answer) -> dict:
    n = answer.completion_tokens
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": n, "total_tokens": answer.prompt_tokens + n,
            "prompt_tokens_details": {"audio_tokens": answer.audio_tokens}}


def _duration(data: bytes) -> float:
    return round(load_audio(data).original_seconds, 3)


async def _stream_chat(backend, slots, conv, gen_opts, rid, created, model, include_usage, request, user_errors):
    """SSE chunks of one answer. The producer thread stops (and closes the pipeline's generator) as
    soon as the client is gone; an error before the first piece is a plain 400, not a stream."""
    from fastapi.responses import StreamingResponse

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    slots.take()

    def produce():
        try:
            gen = backend.stream(conv, gen_opts)
            try:
                for item in gen:
                    loop.call_soon_threadsafe(events.put_nowait, ("item", item))
                    if cancel.is_set():
                        break
            finally:
                gen.close()
        except ApiError as exc:  # a backend's own status (e.g. 503: Triton unreachable)
            loop.call_soon_threadsafe(events.put_nowait, ("error", exc))
        except user_errors as exc:
            loop.call_soon_threadsafe(events.put_nowait, ("error", ApiError(str(exc))))
        except Exception as exc:  # reaches the client as a server_error, with the log holding the trace
            logger.exception("stream failed")
            loop.call_soon_threadsafe(events.put_nowait, ("error", exc))
        finally:
            slots.give()
            loop.call_soon_threadsafe(events.put_nowait, ("end", None))

    threading.Thread(target=produce, name=f"af3trt-openai-{rid[-8:]}", daemon=True).start()
    first = await events.get()
    if first[0] == "error":
        await events.get()  # the producer's "end"
        raise first[1]

    def chunk(delta: dict, reason=None, usage=None, extension=None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": reason,
                                                           "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        if extension is not None:
            body["af3trt"] = extension
        return f"data: {json.dumps(body)}\n\n"

    async def sse():
        event = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            while event[0] != "end":
                kind, item = event
                if kind == "error":
                    err = _error_body(str(item) if isinstance(item, ApiError) else
                                      f"internal server error ({type(item).__name__}); see the server log",
                                      "invalid_request_error" if isinstance(item, ApiError) else "server_error")
                    yield f"data: {json.dumps(err)}\n\n"
                elif isinstance(item, Answer):
                    yield chunk({}, item.finish_reason, extension=_extension(item))
                    if include_usage:
                        yield chunk({}, usage=_usage(item))
                elif item:
                    yield chunk({"content": item})
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a client that went away: the producer stops at its next piece

    return StreamingResponse(sse(), media_type="text/event-stream")


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, served_model_name: str = "af3",
          allow_urls: bool = False, max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          encoder: str = "auto", decoder: str = "auto", device: str | None = None, dtype: str | None = None,
          triton_url: str | None = None) -> int:
    """Load the pipeline (`model`) or connect to a Triton server's `af3` model (`triton_url`, gRPC
    HOST:PORT), then serve until interrupted (what `af3trt openai` runs)."""
    import uvicorn

    if (model is None) == (triton_url is None):
        raise OptionError(f"expected --model (in-process) or --triton-url (forward to Triton), exactly one, got "
                          f"{'both' if model is not None else 'neither'}")
    if triton_url is not None:
        given = {k: v for k, v in (("--encoder", encoder), ("--decoder", decoder)) if v != "auto"}
        given.update({k: v for k, v in (("--device", device), ("--dtype", dtype)) if v is not None})
        if given:
            raise OptionError(f"expected no in-process backend options with --triton-url (the Triton repository "
                              f"chose its backends), got {given}")
        backend, what = TritonBackend(triton_url, allow_urls=allow_urls), f"Triton af3 at {triton_url}"
    else:
        from ..runtime import Pipeline

        pipe = Pipeline.from_pretrained(model, encoder=encoder, decoder=decoder, device=device, dtype=dtype,
                                        allow_urls=allow_urls)
        backend, what = InProcess(pipe), model
    app = create_app(backend, ServerOptions(served_model_name, max_queue, max_body_bytes, allow_urls))
    print(f"af3trt openai: serving {served_model_name!r} ({what}) on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
