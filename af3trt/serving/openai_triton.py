"""The `--triton-url` backend of `af3trt openai`: each request goes to the `af3` model of a running
af3trt Triton repository over gRPC streaming (`Af3Client.responses`).

What travels: the whole conversation as CONVERSATION (JSON, audio items indexing AUDIO) with the
audio files' bytes in AUDIO (remote `audio_url`s, where the server allows them, are fetched here
first), and every generation option as its request input (triton_spec.REQUEST_OPTIONS), so the
repository resolves and checks them with the in-process code. `af3` answers TEXT (streamed pieces
with STREAM=true), FINISH_REASON, PROMPT_TOKENS, AUDIO_TOKENS, COMPLETION_TOKENS and WARNINGS.

Closing a stream (the HTTP client went away) closes the gRPC stream with cancel_requests, which `af3`
notices and passes on to its LLM request. Errors: what the repository refuses (its messages name
what was expected and what came) becomes `TritonRequestError`, a UserError (400 in the API); a
message carrying triton_spec.INTERNAL_ERROR an internal error (500); an unreachable server a 503.
"""

from __future__ import annotations

import json

from ..audio import fetch_url
from ..build.triton_spec import INTERNAL_ERROR, PREPROCESSING, REQUEST_OPTIONS
from ..errors import UserError
from .client import PARAMS, Af3Client, RequestFailed
from .openai_schema import Answer, ApiError


class TritonRequestError(UserError):
    """A request the Triton repository refused (its message, unchanged)."""


def _option_keywords() -> dict[str, str]:
    """af3trt option name -> Af3Client keyword, through the request input both name."""
    by_input = {name: kw for kw, (name, _, _) in PARAMS.items()}
    return {opt: by_input[name] for name, opt in REQUEST_OPTIONS.items()}


class TritonBackend:
    """`af3` on the Triton server at `url` (gRPC HOST:PORT). Checked at construction: the server
    answers and `af3` is ready; the limits come from the repository's preprocessing config."""

    def __init__(self, url: str, model: str = "af3", allow_urls: bool = False, timeout_s: float = 600.0):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self.url, self.model, self.allow_urls = url, model, allow_urls
        self.client = Af3Client(grpc_url=url, model=model, timeout_s=timeout_s)
        self.keywords = _option_keywords()
        try:
            with grpcclient.InferenceServerClient(url) as c:
                if not c.is_model_ready(model):
                    raise TritonRequestError(f"expected model {model!r} ready on the Triton server at {url}, got it "
                                             f"not ready (is this an af3trt repository? `af3trt serve --repo REPO`)")
                config = c.get_model_config(PREPROCESSING, as_json=True)["config"]
        except InferenceServerException as exc:
            raise TritonRequestError(f"expected an af3trt Triton server answering gRPC at {url}, got: "
                                     f"{exc.message()}") from None
        params = {k: v.get("string_value") for k, v in (config.get("parameters") or {}).items()}
        self.limits = json.loads(params.get("limits") or "{}")
        self.variant = params.get("variant", "base")

    def info(self) -> dict:
        return {"backend": "triton", "triton_url": self.url, "triton_model": self.model, "limits": self.limits,
                "variant": self.variant}

    def _inputs(self, conv: list[dict], opts: dict, stream: bool):
        unknown = sorted(set(opts) - set(self.keywords))
        if unknown:
            raise ApiError(f"the Triton backend carries no {unknown}", status=500, kind="server_error")
        params = {self.keywords[k]: v for k, v in opts.items() if v is not None}
        return self.client.inputs(stream=stream, conversation=_fetched(conv, self.allow_urls), **params)

    def _responses(self, conv, opts, stream):
        """The af3 model's responses; its errors mapped to what the API answers."""
        try:
            yield from self.client.responses(self._inputs(conv, opts, stream), model=self.model)
        except RequestFailed as exc:
            message = str(exc)
            if exc.status == "StatusCode.UNAVAILABLE":
                raise ApiError(f"the Triton server at {self.url} is unavailable: {message}", status=503,
                               kind="server_error", code="triton_unavailable") from None
            if INTERNAL_ERROR in message:
                raise RuntimeError(f"Triton {self.model}: {message}") from None
            raise TritonRequestError(message) from None

    def generate(self, conv: list[dict], opts: dict):
        """One whole answer (STREAM=false)."""
        texts, done = [], {}
        for result in self._responses(conv, opts, stream=False):
            _read(result, texts, done)
        return _answer("".join(texts), done)

    def stream(self, conv: list[dict], opts: dict):
        """Text pieces as `af3` streams them, then the Answer. Closing it cancels the request."""
        texts, done = [], {}
        responses = self._responses(conv, opts, stream=True)
        try:
            for result in responses:
                before = len(texts)
                _read(result, texts, done)
                yield from texts[before:]
        finally:
            responses.close()
        yield _answer("".join(texts), done)


def _read(result, texts: list[str], done: dict) -> None:
    """One af3 response: TEXT pieces onto `texts`; WARNINGS and the final outputs into `done`."""
    text = result.as_numpy("TEXT")
    if text is not None:
        texts.extend(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text.reshape(-1))
    notes = result.as_numpy("WARNINGS")
    if notes is not None:
        done.setdefault("warnings", []).extend(n.decode("utf-8") if isinstance(n, bytes) else str(n)
                                               for n in notes.reshape(-1))
    for name in ("FINISH_REASON", "PROMPT_TOKENS", "AUDIO_TOKENS", "COMPLETION_TOKENS"):
        value = result.as_numpy(name)
        if value is not None:
            value = value.reshape(-1)[0]
            done[name] = value.decode("utf-8") if isinstance(value, bytes) else int(value)


def _answer(text: str, done: dict):
    missing = [n for n in ("FINISH_REASON", "PROMPT_TOKENS", "AUDIO_TOKENS", "COMPLETION_TOKENS") if n not in done]
    if missing:
        raise RuntimeError(f"expected af3's final response to carry {missing} (an af3trt repository of this "
                           f"version: rewrite it with `af3trt triton`), got outputs {sorted(done)}")
    return Answer(text, done["FINISH_REASON"], done["PROMPT_TOKENS"], done["COMPLETION_TOKENS"],
                  done["AUDIO_TOKENS"], done.get("warnings", []))


def _fetched(conv: list[dict], allow_urls: bool) -> list[dict]:
    """The conversation with remote audio fetched here (the Triton repository takes file bytes only)."""
    out = []
    for msg in conv:
        content = msg["content"]
        if isinstance(content, list):
            content = [{**it, "audio": fetch_url(it["audio"])} if it.get("type") == "audio" and isinstance(
                it.get("audio"), str) and allow_urls else it for it in content]
        out.append({**msg, "content": content})
    return out
