"""The one per-request limits record: `Limits` (manifest.json `limits`, the Pipeline's and the Triton
repository's), and the one rule that checks a request against it (`request_limit_error`).

Torch-free: the manifest, the Triton specs and the python models read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import OptionError
from ..records import RecordMapping
from ..spec import MAX_AUDIO_SECONDS

# the `af3trt build` option that raises each per-request limit
LIMIT_OPTIONS = {"audio tokens": "--max-audio-seconds", "30 s windows": "--max-audio-seconds",
                 "prompt tokens": "--max-audio-seconds / --max-text-tokens",
                 "text tokens besides audio": "--max-text-tokens", "max_new_tokens": "--max-new-tokens",
                 "prompt + max_new_tokens": "--max-new-tokens"}


def check_limit_fields(owner: str, obj, int_fields: tuple[str, ...], seconds_optional: bool = False) -> None:
    """Validate a limits dataclass: each of `int_fields` an int >= 1, `max_audio_seconds` in (0, 600]
    (None: unchecked, when `seconds_optional`)."""
    for name in int_fields:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OptionError(f"{owner}.{name}: expected an int >= 1, got {value!r}")
    if seconds_optional and obj.max_audio_seconds is None:
        return
    if not 0 < obj.max_audio_seconds <= MAX_AUDIO_SECONDS:
        raise OptionError(f"{owner}.max_audio_seconds: expected (0, {MAX_AUDIO_SECONDS}] s (longer audio is "
                         f"truncated), got {obj.max_audio_seconds!r}")


def request_limit_error(limits: Mapping, *, audio_tokens: int, prompt_tokens: int, max_new_tokens: int | None = None,
                        windows: int | None = None) -> str | None:
    """The one per-request limits rule, for the Pipeline and Triton's preprocessing alike: the first
    limit a request exceeds, as "expected at most L what (engine limit; `af3trt build OPTION` raises
    it), got G", or None.

    limits: a `Limits` or a mapping with any of its fields: max_audio_tokens (prompt-table rows one
    request may hold: the executor allows max_prompt_embedding_table_size // max_batch_size,
    promptTuningBuffers.cpp), max_windows (30 s encoder windows: the encoder's profile maximum),
    max_input_len, max_text_tokens (prompt tokens besides audio), max_new_tokens, max_seq_len. A
    limit that is absent or None is not checked.
    """
    checks = [("audio tokens", audio_tokens, limits.get("max_audio_tokens")),
              ("30 s windows", windows, limits.get("max_windows")),
              ("prompt tokens", prompt_tokens, limits.get("max_input_len")),
              ("text tokens besides audio", prompt_tokens - audio_tokens, limits.get("max_text_tokens")),
              ("max_new_tokens", max_new_tokens, limits.get("max_new_tokens")),
              ("prompt + max_new_tokens", None if max_new_tokens is None else prompt_tokens + max_new_tokens,
               limits.get("max_seq_len"))]
    for what, got, limit in checks:
        if got is not None and limit is not None and got > limit:
            return (f"expected at most {limit} {what} (engine limit; `af3trt build {LIMIT_OPTIONS[what]}` raises it), "
                    f"got {got}")
    return None


@dataclass(frozen=True)
class Limits(RecordMapping):
    """Per-request and engine-wide limits (None = not checked), as manifest.json `limits` records them.

    max_batch_size: sequences in flight in the LLM; max_audio_seconds: audio per request (all of its
    audios together); max_windows: 30 s encoder windows per request; max_audio_tokens: prompt-table
    rows per request (the executor's max_prompt_embedding_table_size // max_batch_size);
    max_input_len: prompt tokens (audio rows + text); max_text_tokens: prompt tokens besides audio;
    max_new_tokens: per request; max_seq_len: prompt + new tokens; max_prompt_embedding_table_size
    and max_num_tokens: the engine's build sizes. A read-only mapping of its fields too, so
    `limits["max_audio_tokens"]` and `limits.get(...)` read it as they read the manifest record.
    """

    max_batch_size: int | None = None
    max_audio_seconds: float | None = None
    max_windows: int | None = None
    max_audio_tokens: int | None = None
    max_input_len: int | None = None
    max_text_tokens: int | None = None
    max_new_tokens: int | None = None
    max_seq_len: int | None = None
    max_prompt_embedding_table_size: int | None = None
    max_num_tokens: int | None = None

    def __post_init__(self):
        owner = type(self).__name__
        check_limit_fields(owner, self, tuple(k for k in self._names() if k != "max_audio_seconds"
                                              and getattr(self, k) is not None), seconds_optional=True)
        if None not in (self.max_seq_len, self.max_input_len) and self.max_seq_len <= self.max_input_len:
            raise OptionError(f"{owner}: expected max_seq_len > max_input_len, got {self.max_seq_len} "
                             f"<= {self.max_input_len}")

    @classmethod
    def read(cls, record: Mapping | None) -> "Limits":
        """A manifest `limits` record (or another Limits); absent fields are None, unknown keys an error."""
        if isinstance(record, Limits) and type(record) is cls:
            return record
        record = dict(record or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(record) - set(names))
        if unknown:
            raise OptionError(f"expected limits among {names}, got unknown keys {unknown}")
        if record.get("max_audio_seconds") is not None:
            record["max_audio_seconds"] = float(record["max_audio_seconds"])
        return cls(**record)

    def record(self) -> dict:
        """The JSON record (manifest.json `limits`, the repository's marker and parameters)."""
        return dataclasses.asdict(self)

    def request_error(self, *, audio_tokens: int, prompt_tokens: int, max_new_tokens: int | None = None,
                      windows: int | None = None) -> str | None:
        """`request_limit_error` against these limits."""
        return request_limit_error(self, audio_tokens=audio_tokens, prompt_tokens=prompt_tokens,
                                   max_new_tokens=max_new_tokens, windows=windows)

    def _items(self) -> dict:
        return {name: getattr(self, name) for name in self._names()}

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
