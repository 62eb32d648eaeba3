"""The generation core (af3trt.runtime.generation) against transformers: each logits processor equals
HF's of the same name on random logits and histories (exact at fp32), the resolved defaults equal
HF's generation config, stop strings, the incremental detokenizer, streams, and audio decoding at
other rates equal to transformers' `load_audio`."""

import io
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from af3trt.runtime.generation import (
    DEFAULT_MAX_NEW_TOKENS, AnswerStream, BadWords, GenerationDefaults, GenerationOptions, IncrementalDetokenizer,
    MinNewTokens, MinP, OptionError, PresenceFrequencyPenalty, RepetitionPenalty, SuppressPaddedVocab, Temperature,
    TokenState, TopK, TopP, processors_for, token_state)
from af3trt.audio import synthetic_audio

from .test_parity import hf_generate
from .test_prompt import CASES, audio_turn

lp = pytest.importorskip("transformers.generation.logits_process")

V, B, L = 97, 4, 13
AUDIO_ID = 90  # stands for `<sound>`: HF's history holds it at every audio row


def random_case(seed=0, prompt_len=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    history = torch.randint(0, V, (B, L), generator=g)
    history[:, 2:6] = AUDIO_ID  # an audio's rows
    return logits, history, prompt_len


def state_for(chain, history, prompt_len):
    """Our TokenState after the prompt (history[:, :prompt_len]) and the generated rest, as HF sees it."""
    state = token_state(chain, history[:, :prompt_len].tolist(), V, "cpu")
    for step in range(prompt_len, history.shape[1]):
        state.append(history[:, step])
    return state


def same(ours, ref, what):
    both_inf = torch.isinf(ours) & torch.isinf(ref) & (torch.sign(ours) == torch.sign(ref))
    diff = torch.where(both_inf, 0.0, (ours - ref).abs()).max().item()
    print(f"{what}: max |ours - HF| = {diff:.3e}")
    assert diff == 0.0 and torch.equal(torch.isinf(ours), torch.isinf(ref))


@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_repetition_penalty_equals_hf(penalty):
    logits, history, n = random_case(1)
    ours = RepetitionPenalty(penalty)
    same(ours(logits.clone(), state_for([ours], history, n)),
         lp.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone()), f"repetition {penalty}")


@pytest.mark.parametrize("proc,ref", [
    (Temperature(0.7), lambda: lp.TemperatureLogitsWarper(0.7)),
    (TopK(5), lambda: lp.TopKLogitsWarper(5)),
    (TopK(500), lambda: lp.TopKLogitsWarper(500)),
    (TopP(0.8), lambda: lp.TopPLogitsWarper(0.8)),
    (TopP(0.05), lambda: lp.TopPLogitsWarper(0.05)),
    (MinP(0.1), lambda: lp.MinPLogitsWarper(0.1)),
    (MinP(1.0), lambda: lp.MinPLogitsWarper(1.0)),
])
def test_warpers_equal_hf(proc, ref):
    for seed in range(3):
        logits, history, n = random_case(seed)
        same(proc(logits.clone(), state_for([proc], history, n)), ref()(history, logits.clone()),
             f"{type(proc).__name__} seed {seed}")


@pytest.mark.parametrize("generated", [0, 2, 4])
def test_min_new_tokens_equals_hf(generated):
    logits, history, _ = random_case(3)
    n = L - generated
    ours = MinNewTokens(3, [5, 7])
    same(ours(logits.clone(), state_for([ours], history, n)),
         lp.MinNewTokensLengthLogitsProcessor(n, 3, [5, 7])(history, logits.clone()), f"min_new_tokens after {generated}")


def test_bad_words_equal_hf_single_and_multi_token():
    logits, history, n = random_case(4)
    history[0, -2:] = torch.tensor([11, 12])  # row 0 ends with the prefix of [11, 12, 13]
    history[1, -1] = 40  # row 1 with the prefix of [40, 41]
    words = [[3], [11, 12, 13], [40, 41], [5]]  # [5] is an eos id: HF drops it
    ours = BadWords(words, eos_token_ids=[5])
    ref = lp.NoBadWordsLogitsProcessor(words, eos_token_id=[5])(history, logits.clone())
    got = ours(logits.clone(), state_for([ours], history, n))
    same(got, ref, "bad words")
    assert torch.isinf(got[0, 13]) and torch.isinf(got[1, 41]) and not torch.isinf(got[2, 13])


def test_presence_and_frequency_penalties_follow_openai():
    logits, history, n = random_case(5)
    ours = PresenceFrequencyPenalty(0.5, 0.25)
    got = ours(logits.clone(), state_for([ours], history, n))
    counts = torch.zeros(B, V)
    counts.scatter_add_(1, history[:, n:], torch.ones_like(history[:, n:], dtype=torch.float32))  # generated ids only
    want = logits - 0.5 * (counts > 0).float() - 0.25 * counts
    same(got, want, "presence/frequency (OpenAI: mu - c*freq - [c>0]*presence)")


def test_padded_vocab_rows_are_never_generated():
    logits = torch.zeros(2, 70)
    logits[:, 64:] = 100.0  # padded rows of an lm_head padded to 70 for a 64-id model
    state = TokenState([[1], [2]], 70, "cpu")
    out = SuppressPaddedVocab(64)(logits, state)
    assert out.argmax(-1).tolist() != [64, 64] and torch.isinf(out[:, 64:]).all()
    assert SuppressPaddedVocab(70)(logits, state) is logits


def test_processor_chain_equals_hf_for_the_checkpoints_generation_config(pipe, hf):
    """Teacher-forced: the tiny checkpoint's own generation_config (sampling, top-k 20, top-p 0.8,
    temperature 0.7, repetition 1.05) through HF's processor list and through ours."""
    model, _ = hf
    config, _ = model._prepare_generation_config(None, min_new_tokens=2)
    ref_chain = model._get_logits_processor(config, input_ids_seq_length=L - 1, device="cpu")
    opts = pipe.options(min_new_tokens=2)
    print("HF:", [type(p).__name__ for p in ref_chain], "ours:", [type(p).__name__ for p in processors_for(opts)])
    assert (opts.do_sample, opts.temperature, opts.top_k, opts.top_p, opts.repetition_penalty) == \
        (config.do_sample, config.temperature, config.top_k, config.top_p, config.repetition_penalty)
    vocab = pipe.spec.text.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, vocab, generator=g) * 4
    history = torch.randint(0, vocab, (B, L), generator=g)
    history[:, 3:7] = pipe.spec.audio_token_id
    chain = processors_for(opts)
    state = token_state(chain, history[:, : L - 1].tolist(), vocab, "cpu")
    state.append(history[:, L - 1])
    ours = logits.clone()
    for proc in chain:
        ours = proc(ours, state)
    same(ours, ref_chain(history, logits.clone()), "the checkpoint's processor chain")


def test_defaults_resolve_like_hf_generate(pipe, hf, tiny_dir, caplog):
    model, _ = hf
    config, _ = model._prepare_generation_config(None)
    opts = pipe.options()
    for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"):
        print(name, "ours", getattr(opts, name), "HF", getattr(config, name))
        assert getattr(opts, name) == getattr(config, name)
    assert set(opts.eos_token_ids) == set(config.eos_token_id)
    assert pipe.options(do_sample=False).repetition_penalty == 1.05  # HF applies it to greedy decoding too
    with pytest.raises(OptionError, match="do_sample=True"):
        pipe.options(do_sample=False, temperature=0.5)
    with pytest.raises(OptionError, match="unknown"):
        pipe.options(max_token=4)
    with pytest.raises(OptionError, match="temperature"):
        pipe.options(temperature=float("inf"))
    with caplog.at_level(logging.INFO, logger="af3trt.runtime.generation"):
        bare = GenerationDefaults.from_config({"eos_token_id": 2}, "a config without max_new_tokens")
    assert bare.options().max_new_tokens == DEFAULT_MAX_NEW_TOKENS and bare.options().do_sample is False
    assert "no max_new_tokens" in caplog.text


def feed_all(answer, ids):
    for t in ids:
        answer.feed([t])
        if answer.done:
            break
    return answer


@pytest.mark.parametrize("seed", range(4))
def test_incremental_detokenizer_equals_full_decode(pipe, seed):
    tok = pipe.tokenizer
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(tok), 60).tolist()  # random ids: byte tokens split UTF-8 sequences
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([t]) for t in ids] + [detok.flush()]
    full = tok.decode(ids, skip_special_tokens=True)
    print(f"seed {seed}: {sum(bool(p) for p in pieces)} pieces, {len(full)} chars")
    assert "".join(pieces) == detok.text == full
    assert not any(p.endswith("\ufffd") for p in pieces[:-1] if p) or "\ufffd" in full


def test_stop_strings_across_tokens_first_token_and_several(pipe):
    tok = pipe.tokenizer
    text = "the weather is fine today and tomorrow"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert len(ids) > 6
    opts = lambda *stop: GenerationOptions(max_new_tokens=100, stop=stop, eos_token_ids=(tok.eos_token_id,))
    # across a token boundary: the end of one piece and the start of the next
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) > 1 and len(pieces[i]) > 1)
    spanning = pieces[k - 1][-1] + pieces[k][:1]
    a = feed_all(AnswerStream(tok, opts(spanning), streaming=True), ids)
    assert a.finish_reason == "stop_string" and a.text == text[: text.index(spanning)]
    assert len(a.tokens) == k + 1  # tokens end with the one that completed the stop string, as HF's do
    # at the first token
    first = AnswerStream(tok, opts(pieces[0]), streaming=True)
    feed_all(first, ids)
    assert first.finish_reason == "stop_string" and first.text == "" and len(first.tokens) == 1
    # several at once: the earliest in the text wins
    several = feed_all(AnswerStream(tok, opts("tomorrow", "fine", "zzz")), ids)
    assert several.text == text[: text.index("fine")] and several.finish_reason == "stop_string"
    # a stream never shows the start of a stop string that later completes
    s = AnswerStream(tok, opts("is fine"), streaming=True)
    shown = ""
    for t in ids:
        s.feed([t])
        shown += s.pending()
        if s.done:
            break
    assert shown == s.text == text[: text.index("is fine")]


def test_eos_and_length_end_an_answer(pipe):
    tok = pipe.tokenizer
    ids = tok.encode("a b c d e", add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    a = feed_all(AnswerStream(tok, GenerationOptions(max_new_tokens=50, eos_token_ids=(eos,))), ids[:2] + [eos] + ids)
    assert a.finish_reason == "stop" and a.tokens == ids[:2] + [eos] and a.text == tok.decode(ids[:2])
    b = feed_all(AnswerStream(tok, GenerationOptions(max_new_tokens=3, eos_token_ids=(eos,))), ids)
    assert b.finish_reason == "length" and b.tokens == ids[:3]


@pytest.mark.parametrize("case", list(CASES))
def test_stream_joined_equals_generate_every_case(case, pipe):
    convs = CASES[case]()
    opts = dict(max_new_tokens=10, do_sample=False)
    results = pipe.generate(convs, **opts)
    if len(convs) == 1:
        pieces = list(pipe.stream(convs[0], **opts))
        assert "".join(pieces) == results[0].text
    joined = [""] * len(convs)
    for index, piece in pipe.stream(convs, **opts):  # a batch: pieces tagged with their conversation
        joined[index] += piece
    print(case, joined)
    assert joined == [r.text for r in results]


def test_stream_with_stop_string_equals_generate(pipe):
    conv = [audio_turn(synthetic_audio(4.0, 12))]
    full = pipe.generate(conv, max_new_tokens=16, do_sample=False)[0].text
    stop = full[5:8]
    if not stop.strip():
        pytest.fail(f"expected a non-blank stop string from {full!r}")
    cut = pipe.generate(conv, max_new_tokens=16, do_sample=False, stop=stop)[0]
    streamed = "".join(pipe.stream(conv, max_new_tokens=16, do_sample=False, stop=stop))
    assert cut.finish_reason == "stop_string" and streamed == cut.text == full[: full.index(stop)]


def test_sampling_options_reach_the_tokens(pipe):
    conv = [audio_turn(synthetic_audio(3.0, 13))]
    greedy = pipe.generate(conv, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)[0].token_ids
    banned = pipe.generate(conv, max_new_tokens=8, do_sample=False, repetition_penalty=1.0,
                           bad_words=[[greedy[0]]])[0].token_ids
    assert banned[0] != greedy[0]
    a = pipe.generate(conv, max_new_tokens=8, seed=11, min_p=0.05)[0].token_ids
    assert a == pipe.generate(conv, max_new_tokens=8, seed=11, min_p=0.05)[0].token_ids
    assert pipe.generate(conv, max_new_tokens=8, seed=11, presence_penalty=2.0, frequency_penalty=1.0)[0].token_ids


# ------------------------------------------------------------------------ audio at other rates


def _speech(rate, channels, seconds=4.0):
    x = synthetic_audio(seconds, 21, rate=rate)
    if channels == 2:
        x = np.stack([x, 0.5 * np.roll(x, 37)], 1)
    return x


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_audio_at_other_rates_gives_hf_samples_and_tokens(rate, channels, pipe, hf, tmp_path):
    from transformers.audio_utils import load_audio as hf_load_audio

    from af3trt.audio import load_audio

    path = tmp_path / f"clip-{rate}-{channels}.wav"
    sf.write(path, _speech(rate, channels), rate, subtype="PCM_16")
    ref = hf_load_audio(str(path), sampling_rate=16000, backend="soundfile")
    ours = load_audio(path).samples
    print(f"{rate} Hz x{channels}: {ours.shape[0]} samples (HF {ref.shape[0]}), "
          f"max |diff| {np.abs(ours - ref).max() if ours.shape == ref.shape else 'shape differs'}")
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    convs = [[{"role": "user", "content": [{"type": "audio", "path": str(path)},
                                           {"type": "text", "text": "What is said?"}]}]]
    for penalty in (1.0, 1.05):
        want = hf_generate(hf, convs, repetition_penalty=penalty)
        got = [r.token_ids for r in pipe.generate(convs, max_new_tokens=12, do_sample=False, repetition_penalty=penalty)]
        print(f"  repetition_penalty={penalty}: HF {want} ours {got}")
        assert got == want


def test_mp3_bytes_decode_like_hf(tmp_path):
    from transformers.audio_utils import load_audio as hf_load_audio

    from af3trt.audio import load_audio

    buf = io.BytesIO()
    sf.write(buf, _speech(44100, 2), 44100, format="MP3", subtype="MPEG_LAYER_III")
    path = tmp_path / "clip.mp3"
    path.write_bytes(buf.getvalue())
    ref = hf_load_audio(str(path), sampling_rate=16000, backend="soundfile")
    assert np.array_equal(load_audio(buf.getvalue()).samples, ref)


def test_greedy_equals_torch_argmax_with_ties_nan_and_inf():
    """The CPU fast path (numpy's argmax) picks what torch.argmax picks: first maximum, NaN first."""
    from af3trt.runtime.generation import greedy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 97, generator=g)
    x[1, [3, 40]] = 9.0  # a tie: the first wins
    x[2, [7, 50]] = float("nan")  # NaN counts as the maximum
    x[3] = float("-inf")
    x[4, 11] = float("inf")
    for logits in (x, x.t().contiguous().t(), x[:, 1:]):  # contiguous, strided, offset views
        assert torch.equal(greedy(logits), logits.argmax(-1))
        assert greedy(logits).dtype == torch.int64
    assert torch.equal(greedy(x.double()), x.double().argmax(-1))  # other dtypes: torch's own argmax


@pytest.mark.parametrize("live", ["batch", "stream", "stop string"])
def test_read_steps_backlog_feeds_answers_as_every_step_would(pipe, live):
    """read_steps feeds rows only when an answer can end (eos id, length, a live answer); the answers
    equal feeding every token at once, with rows ending at different steps."""
    from af3trt.runtime.generation import read_steps

    tok = pipe.tokenizer
    eos = tok.eos_token_id
    rng = np.random.default_rng(1)
    rows = rng.integers(100, 400, (30, 4))
    rows[5, 1] = eos  # row 1 ends at step 6, row 3 at step 17, rows 0 and 2 by length
    rows[16, 3] = eos
    stop = (tok.decode([int(rows[9, 2])]),) if live == "stop string" else ()
    opts = GenerationOptions(max_new_tokens=25, eos_token_ids=(eos,), stop=stop)
    closed = []

    def steps():
        try:
            for r in rows:
                yield torch.as_tensor(r)
        finally:
            closed.append(True)

    answers = [AnswerStream(tok, opts, streaming=live == "stream") for _ in range(4)]
    n = sum(1 for _ in read_steps(steps(), answers, every_step=live == "stream"))
    want = [feed_all(AnswerStream(tok, opts, streaming=live == "stream"), rows[:, i].tolist()) for i in range(4)]
    assert [(a.tokens, a.finish_reason, a.text) for a in answers] == [(w.tokens, w.finish_reason, w.text) for w in want]
    assert n == max(len(w.tokens) for w in want) <= 25 and closed  # stopped when the last answer ended, steps closed


def test_byte_level_token_bytes_are_what_the_tokenizer_decodes(pipe):
    """Every id's bytes (from its byte-level token) are known, and any ids' bytes one after another
    decode to the tokenizer's text: what the stop-string shortcut relies on."""
    from af3trt.runtime.generation import _backend_decode, _token_bytes

    tok = pipe.tokenizer
    decode, special = _backend_decode(tok), frozenset(tok.all_special_ids)
    rows = pipe.fake_id_base  # lm_head rows: past the tokenizer's ids too (no text)
    assert rows > len(tok)
    table = {i: _token_bytes(i, tok._tokenizer, decode, special) for i in range(rows)}
    assert all(b is not None for b in table.values())
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, rows, 12).tolist()
        assert b"".join(table[i] for i in ids).decode("utf-8", "replace") == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(12))
def test_stop_strings_checked_only_where_an_id_can_complete_one_equal_checking_every_id(pipe, seed):
    """The byte-level shortcut (detokenize only at ids holding a stop string's last byte, and after
    one the detokenizer held back) ends every answer where checking after each id does: byte-level
    ids with multi-byte characters split across ids, random ids (bytes that form no character,
    special ids), stops cut from the text at random places."""
    tok = pipe.tokenizer
    rng = np.random.default_rng(seed)
    words = ["weather", " fine", " caf\u00e9", " \u65e5\u672c", " na\u00efve", " \U0001f600", " x", "\n", ".", "\u2407"]
    text = "".join(rng.choice(words) for _ in range(30))
    ids = tok.encode(text, add_special_tokens=False)
    cut = int(rng.integers(0, len(ids)))
    ids = ids[:cut] + rng.integers(0, len(tok), 20).tolist() + ids[cut:]  # random ids amid the text
    full = tok.decode(ids, skip_special_tokens=True)
    for _ in range(8):
        start = int(rng.integers(0, max(1, len(full) - 3)))
        stops = tuple({full[start: start + int(rng.integers(1, 5))], rng.choice(words).strip() or "x"} - {""})
        opts = GenerationOptions(max_new_tokens=len(ids), stop=stops, eos_token_ids=(tok.eos_token_id,))
        lazy = AnswerStream(tok, opts)
        assert lazy.ends_stop is not None and not lazy.every_token
        eager = AnswerStream(tok, opts)
        eager.ends_stop = None  # the check after every id
        feed_all(lazy, ids)
        feed_all(eager, ids)
        assert (lazy.tokens, lazy.finish_reason, lazy.text) == (eager.tokens, eager.finish_reason, eager.text), stops


def test_step_generators_run_in_inference_mode_without_leaking_it():
    """A decoder's steps run in inference mode; a caller outside it stays outside between steps, and
    a caller inside it (Pipeline._run) is not re-entered per step."""
    from af3trt.runtime.generation import in_inference_mode

    def steps():
        for _ in range(3):
            yield torch.is_inference_mode_enabled()

    assert list(in_inference_mode(steps())) == [True] * 3
    outside = []
    for _ in in_inference_mode(steps()):
        outside.append(torch.is_inference_mode_enabled())
    assert outside == [False] * 3
    with torch.inference_mode():
        gen = steps()
        assert in_inference_mode(gen) is gen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_token_loop_reads_the_same_ids_as_on_cpu(pipe):
    """read_steps on CUDA (pinned copies read one step late) gives the CPU loop's answers."""
    from af3trt.runtime.generation import decode_loop, read_steps

    g = torch.Generator().manual_seed(3)
    table = torch.randn(40, 4, 97, generator=g)
    opts = GenerationOptions(max_new_tokens=40, repetition_penalty=1.1, eos_token_ids=(5,))
    got = {}
    for device in ("cpu", "cuda"):
        steps = decode_loop(table[0].to(device), [[1, 2]] * 4, opts, None, lambda nxt, step: table[step + 1].to(device))
        answers = [AnswerStream(pipe.tokenizer, opts) for _ in range(4)]
        for _ in read_steps(steps, answers):
            pass
        got[device] = [(a.tokens, a.finish_reason) for a in answers]
    assert got["cuda"] == got["cpu"]


def test_processors_at_the_real_vocab():
    """AF3's real sizes: 151672 ids (not a multiple of 64), `<sound>` = 151669, an int4_awq lm_head padded
    to 151680, and the checkpoint's repetition penalty 1.05: our chain equals HF's on the model's ids
    and never picks a padded row."""
    vocab, padded, sound = 151672, 151680, 151669
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, padded, generator=g) * 3
    logits[:, vocab:] = 50.0  # the padded rows would win
    history = torch.randint(0, vocab, (2, 40), generator=g)
    history[:, 5:20] = sound
    opts = GenerationOptions(repetition_penalty=1.05, top_k=20, top_p=0.8, temperature=0.7, do_sample=True)
    chain = processors_for(opts, vocab)
    state = token_state(chain, history[:, :30].tolist(), padded, "cpu")
    for step in range(30, 40):
        state.append(history[:, step])
    ours = logits.clone()
    for proc in chain:
        ours = proc(ours, state)
    ref = logits[:, :vocab].clone()
    for proc in (lp.RepetitionPenaltyLogitsProcessor(1.05), lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(20),
                 lp.TopPLogitsWarper(0.8)):
        ref = proc(history, ref)
    same(ours[:, :vocab], ref, "real-vocab chain")
    assert torch.isinf(ours[:, vocab:]).all() and (ours.argmax(-1) < vocab).all()
