"""CPU smoke tests of the benchmarks: latency CLI + schema, accuracy CLI, scaled random model.

No timing assertions: timings on a shared CPU mean nothing; these prove the scripts run, write
what benchmarks/README.md documents, and that the random-weights model is a working AF3.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ("features", "encoder", "prefill", "decode", "ttft", "e2e")
PCT = ("p50", "p90", "min", "max")


def _env(tmp_path):
    return {**os.environ, "AF3TRT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(args, tmp_path, timeout=240):
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _numbers(obj, path="$"):
    """Yield (path, value) of every number in a JSON tree."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def check_latency_schema(result: dict) -> None:
    """The documented schema (benchmarks/README.md): keys present, numbers finite."""
    assert result["schema"] == "af3trt.latency/1"
    for key in ("env", "config", "hardware", "model", "backends", "results", "notes", "elapsed_s"):
        assert key in result, key
    env = result["env"]
    for key in ("time_utc", "host", "gpu", "cuda", "versions", "git"):
        assert key in env, key
    assert {"torch", "transformers", "tensorrt", "tensorrt_llm"} <= set(env["versions"])
    for key in ("device", "device_name", "copy_gbps", "matmul_bf16_tflops"):
        assert key in result["hardware"], key
    assert result["hardware"]["copy_gbps"] > 0 and result["hardware"]["matmul_bf16_tflops"] > 0
    for key in ("source", "weights", "shapes", "summary"):
        assert key in result["model"], key
    for r in result["results"]:
        for key in ("backend", "precision", "audio_seconds", "batch", "new_tokens", "prompt_tokens", "status",
                    "notes", "repeats", "warmup"):
            assert key in r, key
        if r["status"] != "ok":
            assert r["status"].startswith(("skipped: ", "error: ")), r["status"]
            continue
        assert set(r["stages_ms"]) == set(STAGES)
        for stage in STAGES:
            assert set(r["stages_ms"][stage]) == set(PCT), stage
            assert r["stages_ms"][stage]["p50"] >= 0
        assert set(r["tpot_ms"]) == set(PCT) and set(r["rtf"]) == set(PCT)
        for key in ("tokens_per_s", "decode_tokens_per_s", "audio_hours_per_hour", "requests_per_s"):
            assert r["throughput"][key] > 0, key
        assert "peak_memory_gb" in r and len(r["warmup_s"]) == r["warmup"]
        for key in ("decode_ms_per_token", "prefill_ms", "encoder_ms", "pct_of_floor"):
            assert key in r["floor"], key
    for path, value in _numbers(result):
        assert math.isfinite(value), path


def test_latency_cli_tiny_writes_json_markdown_png(tmp_path):
    out = tmp_path / "results.json"
    _run([str(REPO / "benchmarks/latency.py"), "--model", "tiny", "--backends", "hf,torch", "--audio-seconds",
          "10,30", "--batch", "1", "--out", str(out)], tmp_path)
    result = json.loads(out.read_text())
    check_latency_schema(result)
    rows = {(r["backend"], r["audio_seconds"]): r for r in result["results"]}
    assert set(rows) == {("hf", 10.0), ("hf", 30.0), ("torch", 10.0), ("torch", 30.0)}
    assert all(r["status"] == "ok" for r in rows.values()), [r["status"] for r in rows.values()]
    assert rows[("torch", 30.0)]["audio_tokens_per_request"] == 750
    assert rows[("torch", 30.0)]["prompt_tokens"] == rows[("hf", 30.0)]["prompt_tokens"]
    assert rows[("torch", 10.0)]["vs_hf"]["e2e_speedup"] > 0 and "vs_hf" not in rows[("hf", 10.0)]
    assert (tmp_path / "results.md").read_text().count("\n| torch |") == 2
    for png in ("results_latency.png", "results_decode.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_backends_run_or_record_why_not(tmp_path, monkeypatch):
    """torch-fast / torch-fp8 (FastTorchDecoder, eager on CPU) give rows or say why not; trtllm,
    triton and hf-compiled cannot run here and are recorded as skipped, with no numbers."""
    from af3trt.benchmark import LatencyConfig, run_latency
    from af3trt.benchmark.backends import fast_unavailable

    monkeypatch.setenv("AF3TRT_CACHE", str(tmp_path / "cache"))
    cfg = LatencyConfig(backends=("torch", "torch-fast", "torch-fp8", "trtllm", "triton", "hf-compiled"),
                        audio_seconds=(2.0,), batches=(2,), new_tokens=3, repeats=1, warmup=0, device="cpu",
                        measure_floor=False)
    result = run_latency(cfg)
    rows = {r["backend"]: r for r in result["results"]}
    assert rows["torch"]["status"] == "ok"
    for name, fp8 in (("torch-fast", False), ("torch-fp8", True)):
        reason = fast_unavailable(fp8)
        assert rows[name]["status"] == ("ok" if reason is None else f"skipped: {reason}"), rows[name]["status"]
    if rows["torch-fp8"]["status"] == "ok":
        assert (rows["torch"]["precision"], rows["torch-fast"]["precision"], rows["torch-fp8"]["precision"]) == (
            "fp32", "fp32", "fp8")
    for name in ("trtllm", "triton", "hf-compiled"):
        assert rows[name]["status"].startswith("skipped: ") and "stages_ms" not in rows[name], rows[name]
    assert "no server URL" in result["backends"]["triton"]["status"]
    with pytest.raises(ValueError, match="expected backends from"):
        LatencyConfig(backends=("nope",))


def test_every_shape_of_every_backend_warms_up_before_its_timed_calls(tmp_path, monkeypatch):
    """Each (backend, audio seconds, batch) runs `warmup` untimed calls on that very shape, then its
    timed ones, for the transformers reference, af3trt's torch backend and the triton client row
    (its server calls stood in for: the harness around them is what is tested); recorded per row."""
    from af3trt.benchmark import LatencyConfig, run_latency
    from af3trt.benchmark import backends as bk
    from af3trt.benchmark.random_model import hf_available

    monkeypatch.setenv("AF3TRT_CACHE", str(tmp_path / "cache"))
    seen = []

    def counted(cls, fake=False):
        real = cls.run

        def run(self, convs, new_tokens):
            audio = convs[0][0]["content"][0]["audio"]
            seen.append((self.name, len(audio) / 16_000, len(convs)))
            return bk.Call(total=0.01, new_tokens=new_tokens) if fake else real(self, convs, new_tokens)

        monkeypatch.setattr(cls, "run", run)

    names = (("hf",) if hf_available() is None else ()) + ("torch", "triton")  # hf: transformers >= 5
    for cls in (bk.HFBackend, bk.TorchBackend):
        counted(cls)
    counted(bk.TritonBackend, fake=True)
    monkeypatch.setattr(bk.TritonBackend, "unavailable", lambda self: None)
    monkeypatch.setattr(bk.TritonBackend, "setup", lambda self: None)
    cfg = LatencyConfig(backends=names, audio_seconds=(1.0, 2.0), batches=(1, 2), new_tokens=2, repeats=1, warmup=2,
                        device="cpu", measure_floor=False)
    result = run_latency(cfg)
    shapes = [(n, s, b) for s in (1.0, 2.0) for b in (1, 2) for n in names]
    assert seen == [shape for shape in shapes for _ in range(cfg.warmup + cfg.repeats)]  # 3 in a row per shape
    for row in result["results"]:
        assert row["status"] == "ok", row["status"]
        assert row["warmup"] == 2 and len(row["warmup_s"]) == 2 and row["repeats"] == 1
    assert result["config"]["warmup"] == 2


def test_triton_backend_builds_the_repository_request(monkeypatch):
    """The triton backend sends the af3trt repository's request (build.triton.REQUEST_INPUTS) through
    Af3Client: encoded audio in AUDIO, PROMPT, MIN_TOKENS = MAX_TOKENS (a fixed output length), STREAM;
    no server needed to build it."""
    pytest.importorskip("tritonclient.grpc", reason="the triton backend needs tritonclient[grpc]")
    from types import SimpleNamespace

    from af3trt.benchmark.backends import TRITON_INPUTS, TritonBackend, conversation, triton_grpc_url
    from af3trt.build.triton import NUMPY_TO_TRITON, REQUEST_INPUTS
    from af3trt.audio import synthetic_audio

    declared = {t.name: t.dtype for t in REQUEST_INPUTS}
    backend = TritonBackend(SimpleNamespace(triton_url="127.0.0.1:9", triton_grpc_url=None, triton_model="af3"))
    assert "not usable" in backend.unavailable()  # nothing listens on port 9
    backend.setup()
    assert backend.client.grpc_url == "127.0.0.1:10" and backend.stream
    audio = synthetic_audio(1.5)
    sent, build = {}, backend.client.inputs

    def spy(*args, **params):  # what the backend asks Af3Client for
        sent.update(params)
        return build(*args, **params)

    monkeypatch.setattr(backend.client, "inputs", spy)
    inputs = {t.name(): t for t in backend.inputs(conversation(audio), 8)}
    assert set(inputs) == set(TRITON_INPUTS) and {"MAX_TOKENS", "MIN_TOKENS"} <= set(TRITON_INPUTS)
    assert (sent["max_tokens"], sent["min_tokens"]) == (8, 8)
    for name, t in inputs.items():  # the client's dtype names -> config.pbtxt's
        assert {"BYTES": NUMPY_TO_TRITON["bytes"]}.get(t.datatype(), f"TYPE_{t.datatype()}") == declared[name], name
    assert inputs["AUDIO"].shape() == inputs["PROMPT"].shape() == inputs["MIN_TOKENS"].shape() == [1]
    with pytest.raises(ValueError, match="expected the Triton HTTP URL as host:port"):
        triton_grpc_url("localhost")
    assert triton_grpc_url("h:8000", "h:9001") == "h:9001"


def test_accuracy_cli_tiny_smoke(tmp_path):
    out = tmp_path / "acc.json"
    _run([str(REPO / "benchmarks/accuracy.py"), "--candidate-dtype", "bfloat16", "--max-new-tokens", "8", "--out",
          str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["schema"] == "af3trt.accuracy/1" and result["data"]["items"] == 1
    for role in ("reference", "candidate"):
        assert result[role]["reference_words"] == 14 and result[role]["wer"] >= 0
    assert result["logits"]["positions"] == 8
    assert 0 <= result["logits"]["top1_agreement"] <= 1 and result["logits"]["kl_mean"] >= 0
    for _, value in _numbers(result):
        assert math.isfinite(value)


def test_teacher_forced_logits_reproduce_greedy_answer(pipe):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import accuracy

    from af3trt.assets import SPEECH_TEXT, SPEECH_WAV

    conv = accuracy.conversation(SPEECH_WAV)
    answer = pipe.generate(conv, do_sample=False, max_new_tokens=6)[0].token_ids
    logits = accuracy.teacher_forced_logits(pipe, conv, answer)
    assert logits.shape == (len(answer), pipe.spec.text.vocab_size)
    assert logits.argmax(-1).tolist() == answer
    same = accuracy.logit_agreement(pipe, pipe, [accuracy.Item(SPEECH_WAV, SPEECH_TEXT)], [answer])
    assert same["top1_agreement"] == 1.0 and same["kl_max"] < 1e-9
    from af3trt.benchmark.backends import fast_decoder, fast_unavailable, with_decoder

    if fast_unavailable() is None:  # the step-by-step (prefill + decode) path of FastTorchDecoder
        fast = with_decoder(pipe, fast_decoder(pipe.decoder))
        stepped = accuracy.teacher_forced_logits(fast, conv, answer)
        print("fast vs torch teacher-forced logits, max abs diff", (stepped - logits).abs().max().item())
        assert stepped.argmax(-1).tolist() == answer
        torch.testing.assert_close(stepped, logits, rtol=1e-4, atol=1e-4)
    wer = accuracy.corpus_wer(["The cat sat.", "Hello there"], ["the cat sat", "hello"], accuracy.english_normalizer())
    assert wer["reference_words"] == 5 and wer["wer"] == pytest.approx(1 / 5)


def test_random_model_small_scale_matches_hf_and_shares_weights(tiny_dir):
    from af3trt.benchmark.backends import conversations
    from af3trt.benchmark.random_model import build
    from af3trt.tiny import full_spec

    spec = full_spec()
    assert (spec.text.hidden_size, spec.text.intermediate_size, spec.text.num_layers, spec.text.num_heads,
            spec.text.num_kv_heads, spec.text.vocab_size) == (3584, 18944, 28, 28, 4, 151672)
    assert (spec.audio.hidden_size, spec.audio.num_layers, spec.audio.num_heads, spec.audio.intermediate_size) == (
        1280, 32, 20, 5120)
    models = build(1 / 28, device="cpu", dtype=torch.float32, tokenizer_dir=tiny_dir)
    assert models.spec.text.num_layers == 1 and models.spec.text.vocab_size > 5000
    assert models.weights.startswith("shared")
    assert models.hf.lm_head.weight.data_ptr() == models.pipeline.decoder.module.lm_head.weight.data_ptr()
    convs = conversations(10.0, 2)
    ours = models.pipeline.generate(convs, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert [r.num_audio_tokens for r in ours] == [250, 250]
    inputs = models.processor.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    with torch.inference_mode():
        out = models.hf.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 repetition_penalty=1.0)
    assert [r.token_ids for r in ours] == out[:, inputs["input_ids"].shape[1]:].tolist()


def test_floor_arithmetic_matches_reference_numbers():
    from af3trt.benchmark.floor import decode_weight_bytes, floors, kv_bytes_per_token, model_summary
    from af3trt.tiny import full_spec

    spec = full_spec()
    assert decode_weight_bytes(spec.text) / 1e9 == pytest.approx(14.14, abs=0.01)  # reference/af3.md
    assert kv_bytes_per_token(spec.text) == 56 * 1024
    hw = {"copy_gbps": 4270.0, "matmul_bf16_tflops": 759.0}
    f = floors(spec, hw, batch=1, prompt_tokens=0, new_tokens=0)
    assert f["decode_ms_per_token"] == pytest.approx(3.31, abs=0.01)  # reference/af3.md, H200
    # FP8 layers + bf16 lm_head: 7.60 GB, the 1.78 ms of reference/af3.md
    assert model_summary(spec, hw)["decode_floor_ms_per_token_batch1"]["fp8"] == pytest.approx(1.78, abs=0.01)
    with pytest.raises(ValueError, match="expected weight precision"):
        floors(spec, hw, precision="int3")
