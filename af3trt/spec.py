"""Constants of AF3's audio front end and the model spec read from a checkpoint's config.json.

Every number that describes AF3's audio path is named once here, with its unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingInputError, OptionError

SAMPLE_RATE = 16_000  # Hz, what the Whisper front end expects
WINDOW_SECONDS = 30  # seconds per encoder window (Whisper chunk length)
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480,000 samples in a 30 s window
MAX_WINDOWS = 20  # windows per audio (AF3 processor: max_audio_len 600 s // 30 s)
MAX_AUDIO_SECONDS = MAX_WINDOWS * WINDOW_SECONDS  # 600 s = 10 minutes
MAX_AUDIO_SAMPLES = MAX_WINDOWS * WINDOW_SAMPLES  # 9,600,000 samples
N_FFT = 400  # samples per STFT frame (25 ms)
HOP_LENGTH = 160  # samples between frames (10 ms)
N_MELS = 128  # mel bins (Whisper-large-v3 front end)
FRAMES_PER_WINDOW = WINDOW_SAMPLES // HOP_LENGTH  # 3,000 mel frames per window


def conv_frames(mel_frames):
    """Encoder positions after conv2 (stride 2) for `mel_frames` valid log-mel frames."""
    return (mel_frames - 1) // 2 + 1


def audio_token_count(mel_frames):
    """Audio tokens (prompt-table rows) for `mel_frames` valid mel frames.

    The one place of this arithmetic (DESIGN §1): conv2 halves the frames, AvgPool1d(2) halves
    again. Works on ints, numpy arrays and torch tensors. 3,000 frames -> 750 tokens.
    """
    return (conv_frames(mel_frames) - 2) // 2 + 1


def mel_frames_for_samples(num_samples):
    """Valid mel frames of a window holding `num_samples` samples (the processor's mask sum)."""
    return (num_samples + HOP_LENGTH - 1) // HOP_LENGTH


TOKENS_PER_WINDOW = audio_token_count(FRAMES_PER_WINDOW)  # 750 embeddings per full window
MAX_AUDIO_TOKENS = MAX_WINDOWS * TOKENS_PER_WINDOW  # 15,000 rows for 10 minutes


def audio_tokens_for_seconds(seconds: float) -> int:
    """Audio tokens of a clip lasting `seconds` (capped at MAX_AUDIO_SECONDS), as the processor counts."""
    samples = min(int(round(seconds * SAMPLE_RATE)), MAX_AUDIO_SAMPLES)
    if samples <= 0:
        return 0
    full, rest = divmod(samples, WINDOW_SAMPLES)
    frames = full * FRAMES_PER_WINDOW + mel_frames_for_samples(rest)
    return int(audio_token_count(frames))


@dataclass(frozen=True)
class AudioSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_mel_bins: int
    max_source_positions: int
    activation: str


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str


@dataclass(frozen=True)
class ModelSpec:
    """What af3trt needs of an AF3 `config.json` (HF layout: audio_config + text_config)."""

    audio: AudioSpec
    text: TextSpec
    audio_token_id: int
    projector_hidden_act: str
    projector_bias: bool

    @classmethod
    def from_config(cls, config: dict) -> "ModelSpec":
        if config.get("model_type") != "audioflamingo3":
            raise ValueError(
                f"expected an AF3 config (model_type 'audioflamingo3'), got model_type {config.get('model_type')!r}"
            )
        for key in ("audio_config", "text_config"):
            if not isinstance(config.get(key), dict):
                raise ValueError(f"AF3 config.json must hold a '{key}' object, got {type(config.get(key)).__name__}")
        a, t = config["audio_config"], config["text_config"]
        rope = t.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta", t.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") != "default" or t.get("rope_scaling"):
            raise ValueError(f"only default RoPE is supported, got {rope or t.get('rope_scaling')}")
        heads = int(t["num_attention_heads"])
        hidden = int(t["hidden_size"])
        return cls(
            audio=AudioSpec(
                hidden_size=int(a.get("hidden_size", a.get("d_model", 1280))),
                num_layers=int(a.get("num_hidden_layers", a.get("encoder_layers", 32))),
                num_heads=int(a.get("num_attention_heads", a.get("encoder_attention_heads", 20))),
                intermediate_size=int(a.get("intermediate_size", a.get("encoder_ffn_dim", 5120))),
                num_mel_bins=int(a.get("num_mel_bins", N_MELS)),
                max_source_positions=int(a.get("max_source_positions", 1500)),
                activation=str(a.get("activation_function", "gelu")),
            ),
            text=TextSpec(
                hidden_size=hidden,
                intermediate_size=int(t["intermediate_size"]),
                num_layers=int(t["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(t.get("num_key_value_heads", heads)),
                head_dim=int(t.get("head_dim") or hidden // heads),
                vocab_size=int(t["vocab_size"]),
                rope_theta=rope_theta,
                rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
                hidden_act=str(t.get("hidden_act", "silu")),
            ),
            audio_token_id=int(config.get("audio_token_id", 151669)),
            projector_hidden_act=str(config.get("projector_hidden_act", "gelu")),
            projector_bias=bool(config.get("projector_bias", True)),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelSpec":
        path = Path(path) / "config.json"
        if not path.is_file():
            raise MissingInputError(f"expected an AF3 checkpoint with config.json at {path}, found none")
        return cls.from_config(json.loads(path.read_text()))


def check_limit_fields(owner: str, obj, int_fields: tuple[str, ...]) -> None:
    """Validate a limits dataclass: each of `int_fields` an int >= 1, `max_audio_seconds` in (0, 600]."""
    for name in int_fields:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OptionError(f"{owner}.{name}: expected an int >= 1, got {value!r}")
    if not 0 < obj.max_audio_seconds <= MAX_AUDIO_SECONDS:
        raise OptionError(f"{owner}.max_audio_seconds: expected (0, {MAX_AUDIO_SECONDS}] s (longer audio is "
                         f"truncated), got {obj.max_audio_seconds!r}")


# the `af3trt build` option that raises each per-request limit
LIMIT_OPTIONS = {"audio tokens": "--max-audio-seconds", "30 s windows": "--max-audio-seconds",
                 "prompt tokens": "--max-audio-seconds / --max-text-tokens",
                 "text tokens besides audio": "--max-text-tokens", "max_new_tokens": "--max-new-tokens",
                 "prompt + max_new_tokens": "--max-new-tokens"}


def request_limit_error(limits, *, audio_tokens: int, prompt_tokens: int, max_new_tokens: int | None = None,
                        windows: int | None = None) -> str | None:
    """The one per-request limits rule, for the Pipeline and Triton's preprocessing alike: the first
    limit a request exceeds, as "expected at most L what (engine limit; `af3trt build OPTION` raises
    it), got G", or None.

    limits: a mapping with any of max_audio_tokens (prompt-table rows one request may hold: the
    executor allows max_prompt_embedding_table_size // max_batch_size, promptTuningBuffers.cpp),
    max_windows (30 s encoder windows: the encoder's profile maximum), max_input_len,
    max_text_tokens (prompt tokens besides audio), max_new_tokens, max_seq_len. A limit that is
    absent or None is not checked.
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
