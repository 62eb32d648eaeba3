"""Calibration audio -> log-mel windows, shared by the encoder PTQ and the decoder calibration.

`calibration_windows(audio_dir, count)` decodes a folder of real audio (sorted by name, every file
cut into 30 s windows) or, without a folder, the bundled speech clip plus deterministic speech-like
`synthetic_audio` signals of varied lengths (full and partial windows, so the padding mask is
exercised). The windows go through the same Whisper front end as inference (`extract_features`).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..assets import SPEECH_WAV
from ..audio import AudioError, load_audio, split_windows, synthetic_audio
from ..errors import MissingInputError
from ..features import extract_features
from ..prompt import left_pad
from ..spec import SAMPLE_RATE, TOKENS_PER_SECOND
from .stage_log import progress

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")  # what af3trt.audio decodes (libsndfile)
# default synthetic clip lengths in seconds: full windows and partial last windows of several sizes
_SYNTHETIC_SECONDS = (30.0, 12.7, 47.3, 3.1, 30.0, 21.9, 8.4, 59.0)


@dataclass(frozen=True)
class CalibrationWindows:
    """Log-mel windows for calibration.

    features: (N, 128, 3000) float32 log-mel; frames: (N,) int64 valid mel frames per window;
    sources: (N,) where each window came from (file name or `synthetic:<seconds>s/<seed>`).
    """

    features: np.ndarray
    frames: np.ndarray
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def as_inputs(self, features: str = "features", frames: str = "frames") -> dict[str, np.ndarray]:
        """The windows as an ONNX input feed {features: (N,128,3000) float32, frames: (N,) int64}."""
        return {features: self.features, frames: self.frames}


def audio_files(audio_dir: str | Path) -> list[Path]:
    """Audio files (WAV/FLAC/MP3/OGG) directly in `audio_dir`, sorted by name."""
    root = Path(audio_dir)
    if not root.is_dir():
        raise MissingInputError(f"expected a folder of calibration audio, got {root} (not a directory)")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise MissingInputError(f"expected audio files {AUDIO_SUFFIXES} in {root}, found none")
    return files


class CalibrationFileSkipped(UserWarning):
    """A file of the calibration folder could not be used (empty, not audio) and was left out."""


def usable_audios(audio_dir: str | Path):
    """Yield (name, 16 kHz samples) of the folder's audio files in name order; a file that does not
    decode is skipped with a CalibrationFileSkipped warning. A folder with no usable file is an error."""

    files, used = audio_files(audio_dir), 0
    for path in files:
        try:
            samples = load_audio(path).samples
        except AudioError as exc:
            warnings.warn(f"calibration: skipping {path}: {exc}", CalibrationFileSkipped, stacklevel=2)
            continue
        used += 1
        yield path.name, samples
    if not used:
        raise MissingInputError(f"expected usable audio in {audio_dir}, got none of its {len(files)} files decodable")


def _default_audios(count: int, seed: int) -> list[tuple[str, np.ndarray]]:
    out = [(SPEECH_WAV.name, load_audio(SPEECH_WAV).samples)]
    i = 0
    while sum(_windows_of(a) for _, a in out) < count:
        seconds = _SYNTHETIC_SECONDS[i % len(_SYNTHETIC_SECONDS)]
        out.append((f"synthetic:{seconds}s/{seed + i}", synthetic_audio(seconds, seed + i)))
        i += 1
    return out


def _windows_of(samples: np.ndarray) -> int:
    return len(split_windows(samples))


def calibration_windows(audio_dir: str | Path | None = None, count: int = 16, seed: int = 0) -> CalibrationWindows:
    """Up to `count` log-mel windows of calibration audio, in file order.

    audio_dir: a folder of real audio (the recommended source: audio like the deployment's); None =
    the bundled speech clip plus synthetic speech-like signals (seeded by `seed`), enough for `count`.
    """

    if count < 1:
        raise ValueError(f"expected at least 1 calibration window, got count={count}")
    if audio_dir is None:
        audios = _default_audios(count, seed)
    else:
        audios, total = [], 0
        for name, samples in usable_audios(audio_dir):
            audios.append((name, samples))
            total += _windows_of(samples)
            if total >= count:
                break
    feats = extract_features([a for _, a in audios])
    sources = tuple(name for (name, _), n in zip(audios, feats.windows_per_audio) for _ in range(n))
    return CalibrationWindows(
        np.ascontiguousarray(feats.features[:count], dtype=np.float32),
        feats.valid_frames[:count].astype(np.int64),
        sources[:count],
    )


# -- decoder calibration: prompts whose <sound> rows are real encoder embeddings ---------------------

CALIBRATION_PROMPTS = (
    "Transcribe the input speech.",
    "Describe the audio in detail.",
    "What is the speaker saying, and what is the emotion of the voice?",
    "Which sounds or instruments can you hear?",
)
CALIBRATION_ANSWERS = (
    "The spoken content of the audio is \"hello, how are you today\".",
    "A person speaks clearly over a quiet background.",
)


def _calibration_audios(audio_dir, count: int, seed: int) -> list[tuple[str, np.ndarray]]:
    if audio_dir is None:
        return _default_audios(count, seed)[:count]
    return list(itertools.islice(usable_audios(audio_dir), count))


def llm_calibration_batches(checkpoint_dir, audio_dir=None, count: int = 16, max_tokens: int = 1024, *,
                            text_only: bool = False, seed: int = 0, device: str | None = None,
                            variant: str = "base") -> list[dict]:
    """Audio-conditioned calibration batches for the decoder (ModelOpt's forward loop).

    Each batch is one prompt as the decoder sees it at inference: the chat template, the audio's
    `<sound>` rows replaced by the encoder + projector embeddings of real audio (files of
    `audio_dir`, default the bundled clip and synthetic speech-like signals), a question and, for
    every other prompt, an assistant answer. Returns dicts {inputs_embeds (1, T, H) float32,
    attention_mask (1, T) int64}, T <= max_tokens (the audio is cut first so the text survives).
    `text_only=True` gives the same prompts without audio: what text-only calibration sees.
    variant: the checkpoint's weights to calibrate ("think": its think/ weights, prompts with the suffix).
    """
    import torch

    from ..runtime.pipeline import Pipeline

    if count < 1 or max_tokens < 16:
        raise ValueError(f"expected count >= 1 and max_tokens >= 16, got {count}, {max_tokens}")
    pipe = Pipeline.from_pretrained(checkpoint_dir, decoder="torch", device=device, dtype="float32", cache_bytes=0,
                                    variant=variant)
    audios = _calibration_audios(audio_dir, count, seed)
    budget_s = max(1.0, (max_tokens - 96) / TOKENS_PER_SECOND)  # keep ~96 tokens for the text

    batches = []
    for i in progress(range(count), "llm_checkpoint: calibration prompts (encoder embeddings)", unit="prompt"):
        name, samples = audios[i % len(audios)]
        clip = samples[: int(budget_s * SAMPLE_RATE)]
        text = {"type": "text", "text": CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)]}
        content = [text] if text_only else [{"type": "audio", "audio": clip}, text]
        conv = [{"role": "user", "content": content}]
        if i % 2:
            conv.append({"role": "assistant", "content": CALIBRATION_ANSWERS[(i // 2) % len(CALIBRATION_ANSWERS)]})
        reqs, _ = pipe.requests(pipe.prepare(conv), pipe.options(max_new_tokens=1))
        ids, mask = left_pad([reqs[0].input_ids[:max_tokens]], 0)
        with torch.inference_mode():
            embeds = pipe.decoder.module.embed(torch.from_numpy(ids), reqs[0].table, None)
        batches.append({"inputs_embeds": embeds.float().clone(), "attention_mask": torch.from_numpy(mask)})
    return batches
