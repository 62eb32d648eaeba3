"""`af3trt build` engine dirs and the runtime on them: stages, skips, interruptions, calibration,
executor arguments vs the torch backend, multi-turn reuse, limits and mismatches, threads."""

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from af3trt.build.engine_dir import BuildOptions, build_engine_dir
from af3trt.build.llm import EngineLimits
from af3trt.formats.manifest import Manifest, ManifestError
from af3trt.prompt import PromptError
from af3trt.runtime import Pipeline
from af3trt.runtime.stitch import executor_arguments
from af3trt.audio import synthetic_audio

from .test_prompt import CASES, audio_turn

HAS_TRT = __import__("importlib").util.find_spec("tensorrt") is not None
HAS_TRTLLM = __import__("importlib").util.find_spec("tensorrt_llm") is not None


def stage_mtimes(root):
    m = Manifest.read(root)
    return {name: (root / e["path"]).stat().st_mtime_ns for name, e in m.stages.items() if "missing" not in e}


# ------------------------------------------------------------------------------------------ build


def test_build_writes_every_stage_and_the_manifest(engine_dir, tiny_dir):
    m = Manifest.read(engine_dir)
    assert set(m.stages) == {"tokenizer", "encoder_onnx", "encoder_plan", "llm_checkpoint", "llm_engine"}
    assert m.limits["max_audio_tokens"] == 15000 and m.limits["max_batch_size"] == 4
    assert m.limits["max_prompt_embedding_table_size"] == 15000 * 4
    assert m.limits["max_input_len"] == 15000 + 2048 and m.limits["max_seq_len"] == 15000 + 2048 + 512
    assert m.versions["af3trt"] and m.checkpoint["path"] == str(tiny_dir.resolve())
    assert all(e["checkpoint"] == m.checkpoint["fingerprint"] for e in m.stages.values())
    assert (engine_dir / "encoder" / "encoder.onnx").is_file() and m.stages["encoder_onnx"]["max_rel_error"] < 1e-4
    cfg = json.loads((engine_dir / "llm" / "checkpoint" / "config.json").read_text())
    assert cfg["architecture"] == "Qwen2ForCausalLM" and cfg["dtype"] == "bfloat16"
    script = (engine_dir / "llm" / "build_engine.sh").read_text()
    assert "trtllm-build" in script and "--max_prompt_embedding_table_size 60000" in script
    assert "--checkpoint_dir checkpoint --output_dir engine" in script and str(engine_dir) not in script
    for name, present in (("encoder_plan", HAS_TRT), ("llm_engine", HAS_TRTLLM)):
        entry = m.stages[name]
        if not present:  # recorded, with the line that completes the build elsewhere
            assert "not installed" in entry["missing"] and entry["command"].startswith("af3trt build --model ")
            assert "--out . " in entry["command"] and "--max-batch-size 4" in entry["command"]
            assert str(engine_dir) not in entry["command"] + entry["manual"]  # relative: the dir can move


def test_unchanged_stages_are_skipped_and_changed_ones_rebuilt(tiny_dir, tmp_path):
    out = tmp_path / "e"
    opts = BuildOptions(precision="bf16", stages=("llm",))
    build_engine_dir(model=tiny_dir, out=out, options=opts)
    first = stage_mtimes(out)
    build_engine_dir(model=tiny_dir, out=out, options=opts)
    assert stage_mtimes(out) == first
    build_engine_dir(model=tiny_dir, out=out, options=BuildOptions(precision="int8_wo", stages=("llm",)))
    second = stage_mtimes(out)
    assert second["tokenizer"] == first["tokenizer"] and second["llm_checkpoint"] != first["llm_checkpoint"]
    m = Manifest.read(out)
    assert m.stages["llm_checkpoint"]["precision"] == "int8_wo" and m.precision["llm"] == "int8_wo"
    assert "encoder_onnx" not in m.stages


def test_interrupted_llm_stage_leaves_the_previous_one(tiny_dir, tmp_path, monkeypatch):
    import af3trt.build.llm as llm

    out = tmp_path / "e"
    opts = BuildOptions(precision="bf16", stages=("llm",))
    build_engine_dir(model=tiny_dir, out=out, options=opts)
    before = Manifest.read(out).stages["llm_checkpoint"], stage_mtimes(out)["llm_checkpoint"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while verifying the export")

    monkeypatch.setattr(llm, "_verify_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_engine_dir(model=tiny_dir, out=out, options=BuildOptions(precision="bf16", stages=("llm",), force=True))
    leftovers = [p.name for p in (out / "llm").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    assert (Manifest.read(out).stages["llm_checkpoint"], stage_mtimes(out)["llm_checkpoint"]) == before
    assert Pipeline.from_pretrained(out, device="cpu").generate([audio_turn(synthetic_audio(1.0))], max_new_tokens=2)


def test_leftovers_of_a_killed_build_are_removed(tiny_dir, tmp_path):
    out = tmp_path / "e"
    for name in (".checkpoint.tmp-x1", ".engine.partial-x2", ".encoder.old"):
        (out / "llm" / name).mkdir(parents=True)
        (out / "llm" / name / "rank0.safetensors").write_bytes(b"half")
    build_engine_dir(model=tiny_dir, out=out, options=BuildOptions(stages=("llm",)))
    assert sorted(p.name for p in (out / "llm").iterdir()) == ["build_engine.sh", "checkpoint"]


def test_build_options_name_the_valid_values():
    with pytest.raises(ValueError, match="int4_awq"):
        BuildOptions(precision="int3")
    with pytest.raises(ValueError, match=r"expected stages from \('encoder', 'llm'\), got \('decoder',\)"):
        BuildOptions(stages=("decoder",))
    with pytest.raises(ValueError, match="expected encoder precision in"):
        BuildOptions(encoder_precision="fp4")


def _input_amax(batches, tiny_dir):
    from af3trt.build.llm import load_qwen2_from_af3, quantize_lm

    model = quantize_lm(load_qwen2_from_af3(tiny_dir, "float32"), "fp8", calib_batches=batches)
    return {n: float(m.amax) for n, m in model.named_modules()
            if n.endswith("input_quantizer") and getattr(m, "amax", None) is not None}


def test_audio_calibration_sees_other_activation_ranges_than_text_only(tiny_dir):
    from af3trt.build.calibration import llm_calibration_batches

    audio = llm_calibration_batches(tiny_dir, count=4, max_tokens=256, device="cpu")
    text = llm_calibration_batches(tiny_dir, count=4, max_tokens=256, text_only=True, device="cpu")
    assert all(a["inputs_embeds"].shape[1] > t["inputs_embeds"].shape[1] for a, t in zip(audio, text))
    with_audio, text_only = _input_amax(audio, tiny_dir), _input_amax(text, tiny_dir)
    assert with_audio.keys() == text_only.keys() and len(with_audio) >= 8
    ratio = {n: with_audio[n] / text_only[n] for n in with_audio}
    print("amax audio / text-only:", {n.split("model.")[-1]: round(r, 3) for n, r in ratio.items()})
    # ranges a text-only calibration would fix are off by up to ~1.5x on the audio-conditioned prompts
    assert max(abs(r - 1) for r in ratio.values()) > 0.2
    assert sum(abs(r - 1) > 0.05 for r in ratio.values()) >= 4


# --------------------------------------------------------------------------------- runtime


def trtllm_embed(args, embed_tokens, vocab):
    """TensorRT-LLM's prompt-tuning rule, per request: id >= vocab reads row id - vocab of the
    request's own embedding_table; other ids read the token embedding."""
    ids = torch.tensor(args["input_token_ids"])
    x = embed_tokens(ids.clamp(max=vocab - 1))
    ptc = args["prompt_tuning_config"]
    fake = ids >= vocab
    if fake.any():
        x[fake] = ptc["embedding_table"][ids[fake] - vocab].to(x.dtype)
    return x


@pytest.mark.parametrize("case", list(CASES))
def test_executor_arguments_equal_the_torch_backend_inputs(case, engine_pipe):
    from af3trt.prompt import left_pad

    pipe = engine_pipe
    vocab = pipe.spec.text.vocab_size
    reqs, _ = pipe.requests(pipe.prepare(CASES[case]()), pipe.options(max_new_tokens=4, do_sample=False))
    ids, mask = left_pad([r.input_ids for r in reqs], 0)
    rows = [r.table.shape[0] for r in reqs]
    table = torch.cat([r.table for r in reqs]) if sum(rows) else None
    offsets = torch.tensor([sum(rows[:i]) for i in range(len(rows))])
    with torch.inference_mode():
        torch_inputs = pipe.decoder.module.embed(torch.from_numpy(ids), table, offsets)
        for b, req in enumerate(reqs):
            args = executor_arguments(req, end_id=pipe.eos_token_ids[0], pad_id=0)
            assert args["input_token_ids"] == req.input_ids.tolist()
            ptc = args["prompt_tuning_config"]
            if req.table.shape[0] == 0:
                assert ptc is None and max(args["input_token_ids"]) < vocab
                extra = np.zeros(req.prompt_len, np.int64)
            else:
                assert ptc["embedding_table"].shape == (sum(req.audio_rows), pipe.spec.text.hidden_size)
                extra = np.asarray(ptc["input_token_extra_ids"])
            assert ((extra > 0) == (req.input_ids >= vocab)).all()
            theirs = trtllm_embed(args, pipe.decoder.module.model.embed_tokens, vocab)
            ours = torch_inputs[b][mask[b].astype(bool)]
            assert torch.equal(ours, theirs), f"{case}: request {b} differs"
            assert args["max_tokens"] == 4 and args["sampling_config"]["top_k"] == 1
            assert args["end_id"] == pipe.eos_token_ids[0]


def test_multi_turn_reuses_extra_ids_and_the_encoder_output(engine_dir):
    pipe = Pipeline.from_pretrained(engine_dir, device="cpu", dtype="float32")
    clip = synthetic_audio(6.0, 11)
    turn1 = [audio_turn(clip)]
    first = pipe.generate(turn1, do_sample=False, max_new_tokens=4)[0]
    assert pipe.encoder_calls == 1
    turn2 = turn1 + [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "And who is speaking?"}]
    opts = pipe.options(max_new_tokens=4)
    (r1,), _ = pipe.requests(pipe.prepare(turn1), opts)
    (r2,), _ = pipe.requests(pipe.prepare(turn2), opts)
    assert pipe.encoder_calls == 1 and pipe.cache.hits >= 2
    n = r1.prompt_len - 3  # the first turn's prompt up to its generation header is a prefix of the second's
    np.testing.assert_array_equal(r2.input_ids[:n], r1.input_ids[:n])
    np.testing.assert_array_equal(r2.extra_ids[:n], r1.extra_ids[:n])
    assert (r2.extra_ids > 0).sum() == r1.audio_rows[0] and torch.equal(r2.table, r1.table)
    pipe.generate(turn2, do_sample=False, max_new_tokens=4)
    assert pipe.encoder_calls == 1
    other = pipe.requests(pipe.prepare([audio_turn(synthetic_audio(6.0, 12))]), opts)[0][0]
    assert set(other.extra_ids[other.extra_ids > 0]) != set(r1.extra_ids[r1.extra_ids > 0])
    assert pipe.encoder_calls == 2


@pytest.fixture(scope="module")
def small_engine(tiny_dir, tmp_path_factory):
    """An engine dir built for 10 s of audio, 64 text tokens and 16 new tokens per request."""
    out = tmp_path_factory.mktemp("small") / "e"
    limits = EngineLimits(max_batch_size=2, max_audio_seconds=10.0, max_text_tokens=64, max_new_tokens=16)
    build_engine_dir(model=tiny_dir, out=out, options=BuildOptions(limits=limits, stages=("llm",)))
    return out


def test_requests_past_the_engine_limits_fail_before_anything_runs(small_engine):
    pipe = Pipeline.from_pretrained(small_engine, device="cpu")
    calls = []
    steps = pipe.decoder.steps
    pipe.decoder.steps = lambda *a, **k: calls.append(1) or steps(*a, **k)
    cases = [
        ([audio_turn(synthetic_audio(12.0))], {}, r"expected at most 250 audio tokens \(engine limit; .*\), got 300"),
        ([{"role": "user", "content": [{"type": "audio", "audio": synthetic_audio(6.0, s)} for s in (1, 2)]}], {},
         r"expected at most 250 audio tokens \(engine limit; .*\), got 300"),
        ([{"role": "user", "content": "word " * 400}], {}, r"at most 314 prompt tokens \(engine limit.*\), got \d+"),
        ([{"role": "user", "content": "word " * 100}], {}, r"expected at most 64 text tokens besides audio \(engine "
         r"limit; `af3trt build --max-text-tokens` raises it\), got \d+"),
        ([audio_turn(synthetic_audio(2.0))], {"max_new_tokens": 17}, r"expected at most 16 max_new_tokens"),
    ]
    for conv, kw, match in cases:
        with pytest.raises(PromptError, match=match):
            pipe.generate(conv, **{"max_new_tokens": 4, "do_sample": False, **kw})
    assert pipe.encoder_calls == 0 and calls == [] and len(pipe.cache) == 0
    assert pipe.generate([audio_turn(synthetic_audio(9.0))], max_new_tokens=16)[0].token_ids
    assert calls == [1]


def _copy(src, dst, edit):
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_engine_dirs_from_elsewhere_are_refused_with_what_differs(small_engine, tmp_path):
    def version(d):
        d["versions"]["af3trt"] = "0.0.1"

    def checkpoint(d):
        d["stages"]["llm_checkpoint"]["checkpoint"] = "0123456789abcdef"

    def no_stage(d):
        del d["stages"]["llm_checkpoint"]

    def fmt(d):
        d["format_version"] = 99

    cases = [(version, r"built by af3trt 0.0.1, this is af3trt \d"),
             (checkpoint, r"stage 'llm_checkpoint' .* built from checkpoint 0123456789abcdef, the manifest says"),
             (no_stage, r"expected stage 'llm_checkpoint' in .*, the build did not run it"),
             (fmt, r"expected manifest format_version 1 \(this af3trt\), got 99")]
    for i, (edit, match) in enumerate(cases):
        with pytest.raises(ManifestError, match=match):
            Pipeline.from_pretrained(_copy(small_engine, tmp_path / str(i), edit), device="cpu")
    gone = _copy(small_engine, tmp_path / "gone", lambda d: None)
    shutil.rmtree(gone / "llm" / "checkpoint")
    with pytest.raises(ManifestError, match=r"lists llm/checkpoint but .* has no such path"):
        Pipeline.from_pretrained(gone, device="cpu")
    with pytest.raises(ManifestError, match=r"expected an af3trt engine dir with manifest.json"):
        Manifest.read(tmp_path)


def test_trtllm_engine_checks_name_what_differs():
    from af3trt.runtime.trtllm import check_engine

    limits = {"max_batch_size": 4, "max_input_len": 17048, "max_seq_len": 17560,
              "max_prompt_embedding_table_size": 60000}
    config = {"build_config": dict(limits), "pretrained_config": {"vocab_size": 640}}
    check_engine(config, limits, "1.2.0", "1.2.0", 640)
    with pytest.raises(ManifestError, match=r"built with TensorRT-LLM 1.1.0, this is 1.2.0"):
        check_engine(config, limits, "1.1.0", "1.2.0", 640)
    small = {**config, "build_config": {**limits, "max_input_len": 2048}}
    with pytest.raises(ManifestError, match=r"other limits .* max_input_len: engine 2048, manifest 17048"):
        check_engine(small, limits, "1.2.0", "1.2.0", 640)
    with pytest.raises(ManifestError, match=r"expected an engine with vocab_size 641 \(the manifest's engine_vocab_size, where fake ids start\), got 640"):
        check_engine(config, limits, "1.2.0", "1.2.0", 641)


def in_threads(n, work, timeout=300):
    """Run work(0) ... work(n - 1) in n threads at once; their dicts merged (any error re-raised)."""
    got, errors = {}, []

    def run(i):
        try:
            got.update(work(i))
        except Exception as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:
        raise errors[0]
    return got


def test_concurrent_threads_equal_sequential_runs(engine_pipe):
    convs = [[audio_turn(synthetic_audio(0.5 + 1.7 * i, 20 + i), f"Question {i}?")] for i in range(8)]
    convs += [[{"role": "user", "content": f"Text question {i}"}] for i in range(8)]
    expected = [engine_pipe.generate(c, do_sample=False, max_new_tokens=5)[0].token_ids for c in convs]
    got = in_threads(8, lambda w: {k: engine_pipe.generate(convs[k], do_sample=False, max_new_tokens=5)[0].token_ids for k in (w, w + 8)})
    assert [got[k] for k in range(16)] == expected


@pytest.mark.trtllm
@pytest.mark.gpu
def test_trtllm_engine_gives_the_torch_tokens(tmp_path):
    """On a machine with TensorRT-LLM 1.2 and a GPU: build the engine and compare greedy tokens."""
    pytest.importorskip("tensorrt_llm", reason="needs TensorRT-LLM 1.2")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from af3trt.tiny import default_tiny_dir, make_tiny_checkpoint

    out = tmp_path / "e"
    limits = EngineLimits(max_batch_size=2, max_audio_seconds=60.0, max_text_tokens=256, max_new_tokens=16)
    build_engine_dir(model=make_tiny_checkpoint(default_tiny_dir()), out=out,
                     options=BuildOptions(precision="fp16", limits=limits))
    convs = CASES["batch mixed lengths"]() + CASES["text only"]()
    trt = Pipeline.from_pretrained(out, decoder="tensorrt_llm", dtype="float16")
    ref = Pipeline.from_pretrained(out, decoder="torch", dtype="float16")
    assert [r.token_ids for r in trt.generate(convs[:2], do_sample=False, max_new_tokens=8)] == \
        [r.token_ids for r in ref.generate(convs[:2], do_sample=False, max_new_tokens=8)]


def test_cli_build_fp8_then_run_the_engine_dir(tiny_dir, tmp_path, capsys):
    """`af3trt build --precision fp8` then `af3trt run` on it: ONNX Runtime encoder + torch decoder
    on the FP8 TensorRT-LLM checkpoint."""
    from af3trt.assets import SPEECH_WAV
    from af3trt.cli import main

    out = tmp_path / "fp8"
    assert main(["build", "--model", str(tiny_dir), "--out", str(out), "--precision", "fp8",
                 "--calib-size", "2", "--calib-max-tokens", "256"]) == 0
    printed = capsys.readouterr().out
    assert "encoder_onnx: encoder/encoder.onnx" in printed and "llm_checkpoint: llm/checkpoint" in printed
    cfg = json.loads((out / "llm" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8"
    assert main(["run", "--model", str(out), "--audio", str(SPEECH_WAV), "--max-new-tokens", "6", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_audio_tokens"] == 144 and len(result["token_ids"]) == 6
    pipe = Pipeline.from_pretrained(out, device="cpu")
    assert pipe.encoder.name == "onnxruntime" and type(pipe.decoder).__name__ == "TorchDecoder"


def test_a_batching_decoder_gets_the_requests_of_all_threads_at_once(engine_pipe):
    """A decoder that declares `concurrent = True` (TensorRT-LLM's executor, in-flight batching) is
    not serialized by the Pipeline: two threads' requests are inside it at the same time."""
    inner = engine_pipe.decoder
    barrier = threading.Barrier(2, timeout=60)

    class InFlight:
        concurrent = True

        def steps(self, requests, generator=None, stats=None):
            barrier.wait()  # returns only once both threads' requests are in the decoder
            yield from inner.steps(requests, generator, stats)

    p = engine_pipe
    pipe = Pipeline(p.builder, p.encoder, InFlight(), p.spec, p.defaults, "cpu", limits=p.limits)
    convs = [[audio_turn(synthetic_audio(1.0 + i, 40 + i))] for i in range(2)]
    expected = [p.generate(c, do_sample=False, max_new_tokens=4)[0].token_ids for c in convs]
    got = in_threads(2, lambda i: {i: pipe.generate(convs[i], do_sample=False, max_new_tokens=4)[0].token_ids})
    assert [got[0], got[1]] == expected
    assert not getattr(p.decoder, "concurrent", False) and isinstance(p._decode_lock, type(threading.Lock()))
