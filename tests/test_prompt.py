import numpy as np
import pytest
import torch

from af3trt.audio import AudioError
from af3trt.prompt import PromptError, fake_ids, left_pad, normalize_conversation, render, strip_transcription_prefix
from af3trt.audio import synthetic_audio


def audio_turn(x, text="Transcribe the input speech.", text_first=False):
    items = [{"type": "audio", "audio": x}, {"type": "text", "text": text}]
    return {"role": "user", "content": items[::-1] if text_first else items}


CASES = {
    "audio+text": lambda: [[audio_turn(synthetic_audio(7.3, 1))]],
    "text only": lambda: [[{"role": "user", "content": "What is an audio language model?"}]],
    "audio only": lambda: [[{"role": "user", "content": [{"type": "audio", "audio": synthetic_audio(31.0, 2)}]}]],
    "system + text-first list": lambda: [[{"role": "system", "content": "Answer briefly."},
                                          audio_turn(synthetic_audio(3.2, 3), "Describe it.", text_first=True)]],
    "multi-turn": lambda: [[audio_turn(synthetic_audio(7.3, 4)),
                            {"role": "assistant", "content": "The spoken content of the audio is \"hello\"."},
                            {"role": "user", "content": [{"type": "text", "text": "Who speaks?"}]}]],
    "batch mixed lengths": lambda: [[audio_turn(synthetic_audio(31.0, 5))],
                                    [audio_turn(synthetic_audio(61.7, 6), "What is said?")]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_equal_hf_processor(case, pipe, hf):
    _, processor = hf
    convs = CASES[case]()
    ref = processor.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    prompts = pipe.prepare(convs)
    ids, mask = left_pad([p.input_ids for p in prompts], pipe.builder.pad_token_id)
    print(case, "HF", tuple(ref["input_ids"].shape), "ours", ids.shape)
    np.testing.assert_array_equal(ref["input_ids"].numpy(), ids)
    np.testing.assert_array_equal(ref["attention_mask"].numpy(), mask)
    if "num_audio_tokens" in ref:
        assert [p.num_audio_tokens for p in prompts if p.audios] == ref["num_audio_tokens"].tolist()


def test_multi_audio_expansion_and_fake_ids(pipe):
    a, b, c = synthetic_audio(2.0, 1), synthetic_audio(31.0, 2), synthetic_audio(1.0, 3)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": a}, {"type": "audio", "audio": b},
                                         {"type": "text", "text": "Compare them."}]},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": [{"type": "audio", "audio": c}, {"type": "text", "text": "And this?"}]}]
    prompt = pipe.prepare(conv)[0]
    assert prompt.audio_tokens == [50, 775, 25]
    ids = np.asarray(prompt.input_ids)
    fake = pipe.builder.fake_ids(prompt)
    vocab = pipe.spec.text.vocab_size
    where = ids == pipe.spec.audio_token_id
    np.testing.assert_array_equal(fake[where], vocab + np.arange(850))
    np.testing.assert_array_equal(fake[~where], ids[~where])
    # placeholders of the first message come as one run before its text, the third audio later
    runs = np.flatnonzero(np.diff(where.astype(int)) != 0)
    assert len(runs) == 4


def test_fake_ids_and_left_pad():
    np.testing.assert_array_equal(fake_ids([1, 9, 9, 2, 9], 9, 100), [1, 100, 101, 2, 102])
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])


def test_render_matches_af3_template_rules():
    msgs = normalize_conversation([{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                {"type": "audio", "audio": "x.wav"},
                                                                {"type": "text", "text": "there"}]}])
    assert render(msgs) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                            "<|im_start|>user\n<sound>Hi there<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("conv,needle", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role in"),
    ([{"content": "x"}], "'role', 'content'"),
    ([{"role": "user", "content": 3}], "str or list"),
    ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "'type': 'text'|'audio'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "expected an 'audio'"),
])
def test_malformed_conversations(conv, needle, pipe):
    with pytest.raises(PromptError, match=needle):
        pipe.prepare(conv)


def test_sound_token_in_text_and_too_short_audio(pipe):
    with pytest.raises(PromptError, match="placeholders"):
        pipe.prepare([{"role": "user", "content": "say <sound> now"}])
    with pytest.raises(AudioError, match="at least 321 samples"):
        pipe.prepare([{"role": "user", "content": [{"type": "audio", "audio": np.zeros(200, np.float32)}]}])


def test_strip_prefix():
    assert strip_transcription_prefix(' The spoken content of the audio is "hello world". ') == "hello world"
    assert strip_transcription_prefix("The transcription of the audio is 'yes'.") == "yes"
    assert strip_transcription_prefix("plain answer") == "plain answer"


def test_audio_references_round_trip():
    """The Triton request's CONVERSATION form: audio items become indices into a parallel list, and back;
    an index out of range or a list element no item names is refused."""
    import pytest

    from af3trt.prompt import PromptError, audio_references, resolve_audio_references

    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "audio", "audio": b"a"}, {"type": "text", "text": "x"},
                                         {"type": "audio", "audio": "b.wav"}]},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "audio", "audio": b"c"}]}]
    refs, sources = audio_references(conv)
    assert sources == [b"a", "b.wav", b"c"] and refs[0] == {"role": "system", "content": "Be brief."}
    assert refs[1]["content"] == [{"type": "audio", "audio": 0}, {"type": "text", "text": "x"},
                                  {"type": "audio", "audio": 1}]
    back = resolve_audio_references(refs, sources)
    assert [it["audio"] for m in back for it in m["content"] if it["type"] == "audio"] == sources
    with pytest.raises(PromptError, match=r"index into AUDIO \(0\.\.2\), got 3"):
        resolve_audio_references([{"role": "user", "content": [{"type": "audio", "audio": 3}]}], sources)
    with pytest.raises(PromptError, match=r"got AUDIO\[1, 2\] unreferenced"):
        resolve_audio_references([{"role": "user", "content": [{"type": "audio", "audio": 0}]}], sources)
