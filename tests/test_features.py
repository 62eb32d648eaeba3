import numpy as np
import pytest

from af3trt.features import extract_features, mel_filters
from af3trt.prompt import num_audio_tokens
from af3trt.spec import FRAMES_PER_WINDOW, SAMPLE_RATE, TOKENS_PER_WINDOW, audio_token_count, audio_tokens_for_seconds

from af3trt.audio import synthetic_audio as noise

WhisperFeatureExtractor = pytest.importorskip("transformers").WhisperFeatureExtractor


@pytest.fixture(scope="module")
def reference():
    return WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)


def test_mel_filters_equal_transformers(reference):
    diff = np.abs(reference.mel_filters - mel_filters()).max()
    print(f"mel filter max abs diff {diff:.2e}")
    assert diff < 1e-12


@pytest.mark.parametrize("seconds", [0.05, 7.3, 30.0, 31.0, 61.7])
def test_log_mel_equals_whisper_feature_extractor(reference, seconds):
    x = noise(seconds, seed=int(seconds * 10))
    ours = extract_features([x])
    chunks = [x[i : i + 30 * SAMPLE_RATE] for i in range(0, len(x), 30 * SAMPLE_RATE)]
    ref = reference(chunks, sampling_rate=SAMPLE_RATE, return_attention_mask=True, return_tensors="np")
    diff = np.abs(ref["input_features"] - ours.features).max()
    print(f"{seconds} s: log-mel max abs diff {diff:.2e}, frames {ours.valid_frames.tolist()}")
    assert diff <= 1e-5
    np.testing.assert_array_equal(ref["attention_mask"], ours.mask)
    assert ours.windows_per_audio == (len(chunks),)


def test_token_count_matches_processor_at_odd_lengths():
    pytest.importorskip("transformers.models.audioflamingo3")
    import torch
    from transformers.models.audioflamingo3.processing_audioflamingo3 import AudioFlamingo3Processor

    frames = torch.arange(1, 3 * FRAMES_PER_WINDOW + 7)
    ref = AudioFlamingo3Processor._get_audio_token_length(None, frames)
    assert torch.equal(audio_token_count(frames), ref)
    assert audio_token_count(FRAMES_PER_WINDOW) == TOKENS_PER_WINDOW == 750
    assert [audio_token_count(f) for f in (1, 2, 3, 4, 5, 6, 7, 8, 9)] == [0, 0, 1, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("seconds,tokens", [(30, 750), (600, 15000), (700, 15000), (0.01, 0), (0.03, 1), (7.3, 182)])
def test_tokens_for_seconds(seconds, tokens):
    assert audio_tokens_for_seconds(seconds) == tokens
    assert num_audio_tokens(min(int(round(seconds * SAMPLE_RATE)), 600 * SAMPLE_RATE)) == tokens


def test_per_window_rows_sum_to_per_audio_count():
    """The encoder emits rows per window; the processor counts over the whole audio: they agree."""
    for samples in range(1, 3 * 30 * SAMPLE_RATE, 997 * 160 + 13):
        full, rest = divmod(samples, 30 * SAMPLE_RATE)
        frames = [FRAMES_PER_WINDOW] * full + ([-(-rest // 160)] if rest else [])
        assert sum(audio_token_count(f) for f in frames) == num_audio_tokens(samples)
