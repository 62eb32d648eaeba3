"""How an encoder graph is checked against the torch module: error measures over the valid embedding
rows, and the verification windows (1 full window; 3 windows, the last partial) every check runs on.
Shared by the ONNX export (af3trt.build.encoder) and the Q/DQ quantization (af3trt.build.encoder_quant).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..audio import split_windows, synthetic_audio
from ..features import log_mel, pad_windows
from ..runtime.encoder import valid_rows

DEFAULT_CALIBRATION_WINDOWS = 32


# -- comparisons (valid rows only: padding rows of a partial window are not compared) -----------------

def relative_error(got: torch.Tensor, ref: torch.Tensor, frames) -> float:
    """max |got - ref| / max |ref| over each window's valid rows; got, ref (W, 750, H)."""
    worst = 0.0
    for i, rows in enumerate(valid_rows(frames)):
        g, r = got[i, :rows].float(), ref[i, :rows].float()
        worst = max(worst, float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)))
    return worst


def cosine_similarity(got: torch.Tensor, ref: torch.Tensor, frames) -> tuple[float, float]:
    """(min, mean) cosine similarity of the valid embedding rows; got, ref (W, 750, H)."""
    rows = [torch.nn.functional.cosine_similarity(got[i, :n].float(), ref[i, :n].float(), dim=-1)
            for i, n in enumerate(valid_rows(frames))]
    cos = torch.cat(rows)
    return float(cos.min()), float(cos.mean())


@functools.lru_cache(maxsize=1)
def _verification_windows() -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """(audio, features, frames): the zero-padded 16 kHz windows, their reference log-mel
    (af3trt.features.log_mel) and valid frames of 1 full window and of 3 windows whose last is
    partial (65.3 s: 3000, 3000, 530 frames); cached, do not modify."""
    out = []
    for seconds, seed in ((30.0, 101), (65.3, 102)):
        audio, mask = pad_windows(split_windows(synthetic_audio(seconds, seed)))
        out.append((audio, log_mel(audio).numpy(), mask.sum(axis=1).astype(np.int64)))
    return tuple(out)


def _verification_batches() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(features, frames) of `_verification_windows`."""
    return tuple((feats, frames) for _, feats, frames in _verification_windows())
