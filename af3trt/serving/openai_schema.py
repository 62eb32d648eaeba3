"""The OpenAI-compatible request schema of `af3trt openai`: pydantic models of chat completions (with
audio parts) and their translation into an af3trt conversation + generation options.

Strict on purpose: a field outside OpenAI's chat schema and af3trt's extensions is a 400 naming it;
a field of OpenAI's schema that af3trt does not implement is a 400 when set to anything but its
default. Audio comes as `input_audio` ({"data": base64, "format": wav|mp3|flac|ogg}, OpenAI's shape)
or `audio_url` with a `data:audio/...;base64,` URI (vLLM's extension); remote http(s) URLs only when
the server was started with `--allow-urls`. Any number of audios per message and per conversation.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
MAX_STOP = 4  # OpenAI's limit on stop sequences


class ApiError(ValueError):
    """A request the API refuses: status code, OpenAI error type, the parameter it concerns."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InputAudio(_Strict):
    data: str
    format: str

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v.lower() not in AUDIO_FORMATS:
            raise ValueError(f"expected input_audio.format in {list(AUDIO_FORMATS)}, got {v!r}")
        return v.lower()


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURL(_Strict):
    url: str


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: AudioURL


Part = Annotated[Union[TextPart, InputAudioPart, AudioURLPart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Part]]
    name: Optional[str] = None


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# OpenAI chat fields af3trt does not implement, with the value that means "not used"
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logprobs": False,
               "top_logprobs": None, "response_format": None, "logit_bias": None, "parallel_tool_calls": None,
               "audio": None, "modalities": None, "prediction": None, "web_search_options": None,
               "reasoning_effort": None, "store": False, "service_tier": None, "metadata": None}


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # extensions (vLLM's `extra_body` names)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    min_tokens: Optional[int] = Field(default=None, ge=0)
    ignore_eos: bool = False
    # OpenAI fields af3trt does not implement: accepted only at their defaults
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    response_format: Optional[Any] = None
    logit_bias: Optional[Any] = None
    parallel_tool_calls: Optional[Any] = None
    audio: Optional[Any] = None
    modalities: Optional[Any] = None
    prediction: Optional[Any] = None
    web_search_options: Optional[Any] = None
    reasoning_effort: Optional[Any] = None
    store: Optional[bool] = False
    service_tier: Optional[Any] = None
    metadata: Optional[Any] = None


def refuse_unsupported(req: ChatRequest) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = getattr(req, name)
        plain_text = name == "response_format" and isinstance(value, dict) and value == {"type": "text"}
        text_only = name == "modalities" and value == ["text"]
        if value not in (neutral, None) and not plain_text and not text_only:
            raise ApiError(f"af3trt does not implement {name!r} (got {value!r}); leave it unset", param=name)
    if req.n not in (None, 1):
        raise ApiError(f"expected n=1 (af3trt returns one choice), got n={req.n}", param="n")


def decode_base64(data: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(f"expected {what} as base64 text, got undecodable input: {exc}", param="messages") from None
    if not raw:
        raise ApiError(f"expected {what} with audio bytes, got none", param="messages")
    return raw


def audio_source(part, where: str, allow_urls: bool):
    """An audio part -> what af3trt.audio.load_audio takes (bytes, or an http(s) URL when allowed)."""
    if isinstance(part, InputAudioPart):
        return decode_base64(part.input_audio.data, f"{where}.input_audio.data")
    url = part.audio_url.url
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if not head.startswith("data:audio/") or not head.endswith(";base64") or not payload:
            raise ApiError(f"expected {where}.audio_url as data:audio/<format>;base64,<data>, got {head[:40]!r}...",
                           param="messages")
        return decode_base64(payload, f"{where}.audio_url")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise ApiError(f"expected {where}.audio_url as a data: URI (or http(s) with --allow-urls), got scheme "
                       f"{scheme or 'none'!r}", param="messages")
    if not allow_urls:
        raise ApiError(f"{where}.audio_url is a remote URL; this server fetches none (start it with --allow-urls)",
                       param="messages")
    return url


def conversation(req: ChatRequest, allow_urls: bool = False) -> list[dict]:
    """ChatRequest messages -> an af3trt conversation (audio as bytes or allowed URLs)."""
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        items = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                items.append({"type": "text", "text": part.text})
            else:
                if m.role != "user":
                    raise ApiError(f"expected audio in user messages only, got audio in a {m.role} message ({where})",
                                   param="messages")
                items.append({"type": "audio", "audio": audio_source(part, where, allow_urls)})
        out.append({"role": m.role, "content": items})
    return out


def options(req: ChatRequest) -> dict:
    """ChatRequest sampling fields -> af3trt generation options (None = the model's default).
    temperature 0 means greedy decoding."""
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(f"expected max_tokens or max_completion_tokens, got both ({req.max_tokens} and "
                       f"{req.max_completion_tokens})", param="max_completion_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and (len(stop) > MAX_STOP or not all(stop)):
        raise ApiError(f"expected at most {MAX_STOP} non-empty stop strings, got {stop!r}", param="stop")
    opts: dict[str, Any] = {
        "max_new_tokens": req.max_completion_tokens or req.max_tokens, "top_p": req.top_p, "seed": req.seed,
        "stop": stop or None, "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "top_k": req.top_k, "min_p": req.min_p, "repetition_penalty": req.repetition_penalty,
        "min_new_tokens": req.min_tokens, "ignore_eos": req.ignore_eos or None,
    }
    if req.temperature == 0:
        opts["do_sample"] = False
    elif req.temperature is not None:
        opts.update(do_sample=True, temperature=req.temperature)
    return opts


def finish_reason(reason: str) -> str:
    """af3trt's finish reasons -> OpenAI's (an eos id or a stop string = "stop")."""
    return "length" if reason == "length" else "stop"


class TranscriptionForm(BaseModel):
    """The multipart form of /v1/audio/transcriptions (the file travels beside it)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: Optional[str] = None
    response_format: Literal["json", "text", "verbose_json"] = "json"
    temperature: Optional[float] = Field(default=None, ge=0.0, le=1.0)


@dataclass
class Answer:
    """What a backend returns for one request: the text, OpenAI's finish_reason ("stop" | "length"),
    token counts (prompt_tokens with the audio rows; completion_tokens with the end id, as
    `Result.token_ids`) and the warnings about the request's audio (`af3trt.audio.audio_warnings`)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    audio_tokens: int
    warnings: list[str]

    @classmethod
    def from_result(cls, result) -> "Answer":
        return cls(result.text, finish_reason(result.finish_reason), result.prompt_tokens, len(result.token_ids),
                   result.num_audio_tokens, list(result.warnings))
