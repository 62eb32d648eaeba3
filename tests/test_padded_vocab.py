"""A vocab that is not a multiple of 64 (issue 12, finding 1). The real AF3 has 151672 = 64 * 2369 + 56
rows; the tiny model at 632 = 64 * 9 + 56 has the same remainder. ModelOpt's INT4 AWQ export pads
the embedding and lm_head to a multiple of 64 (640) and writes the padded vocab_size: fake ids
start there, and the 8 padded ids are never generated nor read as audio rows."""

import json

import pytest
import torch

from af3trt.build.engine_dir import BuildOptions, build_engine_dir
from af3trt.build.llm import EngineLimits
from af3trt.formats.manifest import Manifest
from af3trt.formats.precision import PRECISIONS, engine_vocab_size
from af3trt.runtime import Pipeline
from af3trt.spec import ModelSpec
from af3trt.tiny import make_tiny_checkpoint
from af3trt.audio import synthetic_audio

from .test_prompt import CASES, audio_turn

ODD_VOCAB = 632
PADDED = 640


@pytest.fixture(scope="session")
def tiny632(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt632") / "tiny632", vocab_size=ODD_VOCAB)


@pytest.fixture(scope="session")
def awq632(tiny632, tmp_path_factory):
    """`af3trt build --precision int4_awq` of the 632-vocab tiny model (ONNX encoder + TRT-LLM checkpoint)."""
    from af3trt.cli import main

    out = tmp_path_factory.mktemp("engine632") / "int4_awq"
    assert main(["build", "--model", str(tiny632), "--out", str(out), "--precision", "int4_awq",
                 "--max-batch-size", "2", "--max-audio-seconds", "60", "--max-new-tokens", "64",
                 "--calib-size", "2", "--calib-max-tokens", "256"]) == 0
    return out


def test_engine_vocab_is_decided_once_from_the_precision():
    assert engine_vocab_size(151672, "int4_awq") == 151680 and engine_vocab_size(ODD_VOCAB, "int4_awq") == PADDED
    assert engine_vocab_size(640, "int4_awq") == 640  # the default tiny vocab: nothing to pad
    assert {engine_vocab_size(151672, p) for p in PRECISIONS if p != "int4_awq"} == {151672}


def test_tiny_vocab_size_option_and_its_cache_key(tiny632, tmp_path, capsys, monkeypatch):
    from af3trt.cli import main
    from af3trt.tiny import default_tiny_dir

    cfg = json.loads((tiny632 / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == ODD_VOCAB
    monkeypatch.setenv("AF3TRT_CACHE", str(tmp_path / "cache"))
    assert default_tiny_dir() != default_tiny_dir(vocab_size=ODD_VOCAB) != default_tiny_dir(vocab_size=640)
    assert main(["tiny", "--out", str(tmp_path / "t"), "--vocab-size", "700"]) == 0
    assert json.loads((tmp_path / "t" / "config.json").read_text())["text_config"]["vocab_size"] == 700
    with pytest.raises(FileExistsError, match="vocab_size 700.*expected seed 0, vocab_size 632"):
        make_tiny_checkpoint(tmp_path / "t", vocab_size=ODD_VOCAB)  # a stale dir is never handed back
    assert main(["tiny", "--out", str(tmp_path / "small"), "--vocab-size", "500"]) == 2
    assert "expected vocab_size >= 556 (the tiny tokenizer's ids), got 500" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()


def test_greedy_tokens_equal_hf_at_an_odd_vocab(tiny632):
    pytest.importorskip("transformers.models.audioflamingo3", reason="reference needs transformers >= 5")
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    from .test_parity import hf_generate

    hf = (AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny632, dtype=torch.float32).eval(),
          AutoProcessor.from_pretrained(tiny632))
    pipe = Pipeline.from_pretrained(tiny632, device="cpu", dtype="float32")
    for case in ("audio+text", "batch mixed lengths", "text only"):
        convs = CASES[case]()
        ref = hf_generate(hf, convs)
        ours = [r.token_ids for r in pipe.generate(convs, max_new_tokens=12, do_sample=False, repetition_penalty=1.0)]
        print(case, "HF", ref, "ours", ours)
        assert ours == ref


def test_int4_awq_at_an_odd_vocab_builds_and_answers_through_af3trt_run(awq632, capsys):
    from af3trt.assets import SPEECH_WAV
    from af3trt.cli import main

    cfg = json.loads((awq632 / "llm" / "checkpoint" / "config.json").read_text())
    m = Manifest.read(awq632)
    print("checkpoint vocab", cfg["vocab_size"], "model vocab", m.model["vocab_size"])
    assert cfg["vocab_size"] == PADDED and m.model["vocab_size"] == ODD_VOCAB
    assert m.engine_vocab_size() == PADDED and m.stages["llm_checkpoint"]["vocab_size"] == PADDED
    assert main(["run", "--model", str(awq632), "--audio", str(SPEECH_WAV), "--max-new-tokens", "6", "--no-do-sample", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(result["token_ids"])
    assert result["num_audio_tokens"] == 144 and len(result["token_ids"]) == 6
    assert max(result["token_ids"]) < ODD_VOCAB


def test_fake_ids_start_at_the_padded_vocab_and_padded_ids_are_not_audio(awq632):
    pipe = Pipeline.from_pretrained(awq632, device="cpu", dtype="float32")
    assert pipe.fake_id_base == PADDED and pipe.decoder.vocab_size == PADDED and pipe.decoder.valid_vocab == ODD_VOCAB
    reqs, _ = pipe.requests(pipe.prepare([audio_turn(synthetic_audio(1.0, 3))]), pipe.options(max_new_tokens=1))
    ids = reqs[0].input_ids
    fake = ids[ids >= ODD_VOCAB]
    print("fake ids", fake.min(), "..", fake.max(), "rows", reqs[0].table.shape[0])
    assert fake.min() == PADDED and fake.max() == PADDED + reqs[0].table.shape[0] - 1
    table = torch.ones(4, reqs[0].table.shape[1])
    padded = torch.arange(ODD_VOCAB, PADDED)[None]
    emb = pipe.decoder.module.embed(padded, table, torch.zeros(1, dtype=torch.long))
    assert torch.equal(emb, torch.zeros_like(emb))  # ModelOpt's zero rows, not prompt-table rows


@pytest.mark.parametrize("decoder", ["torch", "torch-fast"])
def test_padded_ids_are_never_generated_even_when_they_score_highest(awq632, decoder):
    """The padded lm_head rows are zero (logit 0); made to win here, the mask must still hold."""
    pipe = Pipeline.from_pretrained(awq632, device="cpu", dtype="float32", decoder=decoder)
    conv = [audio_turn(synthetic_audio(1.0, 5))]
    masked = pipe.generate(conv, max_new_tokens=5, do_sample=False)[0].token_ids
    head = pipe.decoder.module.lm_head.weight if decoder == "torch" else pipe.decoder.w.lm_head.weight
    with torch.no_grad():
        head[ODD_VOCAB:] = 1e3 * torch.randn_like(head[ODD_VOCAB:])
    got = pipe.generate(conv, max_new_tokens=5, do_sample=False)[0].token_ids
    print(decoder, "before", masked, "after boosting the padded rows", got)
    assert got == masked and max(got) < ODD_VOCAB


def test_executor_bans_the_padded_ids():
    """The TensorRT-LLM executor sees the engine's (padded) vocab_size as its vocabulary: the padded
    ids travel as single-token bad words."""
    import numpy as np

    from af3trt.runtime.generation import GenerationOptions
    from af3trt.runtime.stitch import DecoderRequest, executor_arguments

    req = DecoderRequest(np.array([1, 2, PADDED]), torch.zeros(1, 8), np.array([0, 0, 7]), GenerationOptions(),
                         prompt_ids=np.array([1, 2, 5]))
    args = executor_arguments(req, end_id=3, pad_id=0, valid_vocab=ODD_VOCAB, vocab_size=PADDED)
    assert args["bad_words"] == [[i] for i in range(ODD_VOCAB, PADDED)]
    assert executor_arguments(req, end_id=3, pad_id=0, valid_vocab=PADDED, vocab_size=PADDED)["bad_words"] is None


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [None, ODD_VOCAB])
@pytest.mark.parametrize("precision,kv_cache", [("bf16", "auto"), ("fp16", "auto"), ("fp8", "fp8"),
                                                ("int8_wo", "auto"), ("int8_sq", "auto"), ("int4_awq", "auto")])
def test_every_precision_at_an_odd_vocab(tiny632, tiny_dir, tmp_path, precision, kv_cache, vocab):
    """Export (the installed ModelOpt: 0.47 here, 0.37 in .ci/run's second env) and read back."""
    ckpt = tiny632 if vocab else tiny_dir
    model_vocab = ModelSpec.from_dir(ckpt).text.vocab_size
    out = tmp_path / precision
    build_engine_dir(model=ckpt, out=out, options=BuildOptions(
        precision=precision, kv_cache=kv_cache, stages=("llm",), calib_size=2, calib_max_tokens=128,
        limits=EngineLimits(max_batch_size=1, max_audio_seconds=30, max_new_tokens=16)))
    m = Manifest.read(out)
    cfg = json.loads((out / "llm" / "checkpoint" / "config.json").read_text())
    print(precision, "vocab", model_vocab, "->", m.engine_vocab_size(), "quant", cfg["quantization"]["quant_algo"])
    assert m.engine_vocab_size() == engine_vocab_size(model_vocab, precision)
    from af3trt.runtime.decoder import TorchDecoder

    dec = TorchDecoder.from_trtllm_checkpoint(out / "llm" / "checkpoint", ModelSpec.from_dir(ckpt))
    assert dec.valid_vocab == model_vocab and dec.vocab_size == m.engine_vocab_size()
    pipe = Pipeline.from_pretrained(out, device="cpu", dtype="float32")
    tokens = pipe.generate([audio_turn(synthetic_audio(1.0, 2))], max_new_tokens=3, do_sample=False)[0].token_ids
    assert len(tokens) == 3 and max(tokens) < model_vocab


def test_triton_repository_sends_fake_ids_from_the_padded_vocab(awq632, tmp_path):
    import re

    from af3trt.build.triton import inspect_engine_dir, write_repository

    assert inspect_engine_dir(awq632).vocab_size == PADDED
    write_repository(awq632, tmp_path / "repo", llm_backend="python")
    text = (tmp_path / "repo" / "preprocessing" / "config.pbtxt").read_text()
    got = re.search(r'key: "vocab_size"\s*value: \{\s*string_value: "(\d+)"', text)
    print("preprocessing vocab_size", got and got.group(1))
    assert got and int(got.group(1)) == PADDED
