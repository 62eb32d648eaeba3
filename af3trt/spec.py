"""Constants of AF3's audio front end and the model spec read from a checkpoint's config.json.

Every number that describes AF3's audio path is named once here, with its unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingInputError

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
TOKENS_PER_SECOND = TOKENS_PER_WINDOW / WINDOW_SECONDS  # 25 audio tokens per second of audio
MAX_AUDIO_TOKENS = MAX_WINDOWS * TOKENS_PER_WINDOW  # 15,000 rows for 10 minutes
MIN_AUDIO_FRAMES = next(f for f in range(1, FRAMES_PER_WINDOW) if audio_token_count(f) >= 1)  # 3 mel frames
MIN_AUDIO_SAMPLES = (MIN_AUDIO_FRAMES - 1) * HOP_LENGTH + 1  # 321 samples (20 ms): the shortest audio with a token


def audio_tokens_for_samples(num_samples: int) -> int:
    """Audio tokens (prompt-table rows) of an audio of `num_samples` 16 kHz samples, as HF's processor
    counts them: full 30 s windows, then the rest's valid mel frames. The one place of this split."""
    full, rest = divmod(max(int(num_samples), 0), WINDOW_SAMPLES)
    frames = full * FRAMES_PER_WINDOW + (mel_frames_for_samples(rest) if rest else 0)
    return int(audio_token_count(frames))


def audio_tokens_for_seconds(seconds: float) -> int:
    """Audio tokens of a clip lasting `seconds` (capped at MAX_AUDIO_SECONDS), as the processor counts."""
    return audio_tokens_for_samples(min(int(round(seconds * SAMPLE_RATE)), MAX_AUDIO_SAMPLES))


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
