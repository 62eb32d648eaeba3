"""Greedy tokens and stitched input embeddings of af3trt's torch pipeline vs transformers' AF3 (fp32, CPU)."""

import warnings

import numpy as np
import pytest
import torch

from af3trt.audio import synthetic_audio

from .test_prompt import CASES, audio_turn

MAX_NEW = 12


def hf_generate(hf, convs, max_new=MAX_NEW, **options):
    """HF `generate` (greedy unless options say otherwise) -> each row's new ids up to its first eos."""
    model, processor = hf
    inputs = processor.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    options = {"do_sample": False, "repetition_penalty": 1.0, **options}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new, **options)
    eos = set(model.generation_config.eos_token_id)
    seqs = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        seqs.append(row[:cut])
    return seqs


# 1.05 is the published checkpoint's own repetition penalty (and the tiny checkpoint's): HF applies
# it under greedy decoding too, over a history with the `<sound>` id at every audio row
PENALTIES = [1.0, 1.05]


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_hf(case, penalty, pipe, hf):
    convs = CASES[case]()
    ref = hf_generate(hf, convs, repetition_penalty=penalty)
    ours = [r.token_ids for r in pipe.generate(convs, max_new_tokens=MAX_NEW, do_sample=False,
                                               repetition_penalty=penalty)]
    print(case, f"repetition_penalty={penalty}", "HF", ref, "ours", ours)
    assert ours == ref


@pytest.mark.parametrize("penalty", PENALTIES)
def test_greedy_tokens_equal_hf_on_10_5_minutes(penalty, pipe, hf):
    convs = [[audio_turn(synthetic_audio(630.0, 7))]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf_generate(hf, convs, max_new=4, repetition_penalty=penalty)
        results = pipe.generate(convs, max_new_tokens=4, do_sample=False, repetition_penalty=penalty)
    print("10.5 min: HF", ref, "ours", [r.token_ids for r in results], "audio tokens", results[0].num_audio_tokens)
    assert results[0].num_audio_tokens == 15000
    assert [r.token_ids for r in results] == ref


@pytest.mark.parametrize("case", ["audio+text", "batch mixed lengths", "multi-turn"])
def test_stitched_embeddings_equal_hf_masked_scatter(case, pipe, hf):
    model, processor = hf
    convs = CASES[case]()
    inputs = processor.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        audio = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
        where = (inputs["input_ids"] == model.config.audio_token_id)[..., None].expand_as(embeds)
        ref = embeds.masked_scatter(where, audio)

        from af3trt.prompt import left_pad

        reqs, _ = pipe.requests(pipe.prepare(convs), pipe.options(max_new_tokens=1))
        ids, _ = left_pad([r.input_ids for r in reqs], 0)
        rows = [r.table.shape[0] for r in reqs]
        offsets = torch.tensor([sum(rows[:i]) for i in range(len(rows))])
        ours = pipe.decoder.module.embed(torch.from_numpy(ids), torch.cat([r.table for r in reqs]), offsets)
    pad = (inputs["attention_mask"] == 0)[..., None]
    ours = torch.where(pad, ref, ours)  # padding positions embed other pad ids; they are masked everywhere
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"{case}: max relative diff of stitched embeddings {err:.2e} (fp32 budget 1e-5)")
    assert err <= 1e-5


def test_sampling_is_seeded_and_stop_strings(pipe):
    conv = [audio_turn(synthetic_audio(3.0, 9))]
    a = pipe.generate(conv, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=3)[0]
    b = pipe.generate(conv, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=3)[0]
    assert a.token_ids == b.token_ids
    full = pipe.generate(conv, max_new_tokens=12, do_sample=False)[0]
    stop = full.text[3:6]
    if stop:
        cut = pipe.generate(conv, max_new_tokens=12, stop=[stop], do_sample=False)[0]
        assert cut.finish_reason == "stop_string" and stop not in cut.text
        assert full.text.startswith(cut.text)


def test_stream_joins_to_generate_text(pipe):
    conv = [audio_turn(synthetic_audio(4.0, 10))]
    pieces = list(pipe.stream(conv, max_new_tokens=10, seed=5))
    assert "".join(pieces) == pipe.generate(conv, max_new_tokens=10, seed=5)[0].text
    assert len(pieces) >= 2


def test_min_new_tokens_and_result_fields(pipe):
    conv = [audio_turn(synthetic_audio(2.0, 11))]
    r = pipe.generate(conv, max_new_tokens=6, min_new_tokens=6)[0]
    assert len(r.token_ids) == 6 and r.finish_reason in ("length", "stop")
    assert r.num_audio_tokens == 50
    for key in ("features", "encoder", "prefill", "decode", "ttft", "total"):
        assert r.timings[key] >= 0


def test_transcribe_bundled_clip(pipe):
    from af3trt.assets import SPEECH_WAV

    text = pipe.transcribe(str(SPEECH_WAV), max_new_tokens=8)
    assert isinstance(text, str)
