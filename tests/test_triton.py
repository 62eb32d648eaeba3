"""Triton model repository (af3trt.build.triton) and a real tritonserver on CPU (af3trt.serving).

Config tests parse every generated config.pbtxt with Triton's protobuf schema. Server tests
(`-m triton_server`) share ONE tritonserver from the nvidia-pytriton wheel for the session
(conftest's `server`, also behind tests/test_openai.py's --triton-url mode), on
127.0.0.1 with free ports, serving the CPU repository (python LLM backend) of the tiny model's
engine dir (`engine_dir`, as `af3trt build --model tiny` writes it); answers are compared with the
in-process Pipeline on the same engine dir (`engine_pipe`).
"""

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from af3trt.assets import SPEECH_WAV
from af3trt.build.triton import (
    LLM_INPUTS, LLM_OUTPUTS, MARKER, ServingLimits, write_repository,
)

PROMPT = "Transcribe the input speech."
MAX_TOKENS = 16
MODELS = {"preprocessing", "audio_encoder", "prompt_table", "tensorrt_llm", "postprocessing", "ensemble", "af3"}


def parse_config(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = path.read_text()
    assert "${" not in text, f"unfilled placeholder in {path}"
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def parse_repository(repo):
    configs = {p.parent.name: parse_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}
    assert set(configs) == MODELS
    return configs


def io_signature(tensors):
    return [(t.name, t.data_type, list(t.dims), list(t.reshape.shape) if t.HasField("reshape") else None)
            for t in tensors]


def check_min_tokens(configs):
    """MIN_TOKENS (INT32 [1], optional) on the request models -> preprocessing's min_tokens -> the LLM's
    min_tokens (the C++ backend's scalar: [1] reshaped to [], optional), in the ensemble and `af3`."""
    from tritonclient.grpc import model_config_pb2

    int32 = model_config_pb2.TYPE_INT32
    for name in ("preprocessing", "ensemble", "af3"):
        request = {t.name: t for t in configs[name].input}["MIN_TOKENS"]
        assert (request.data_type, list(request.dims), request.optional) == (int32, [1], True), name
    prep = {t.name: t for t in configs["preprocessing"].output}["min_tokens"]
    assert (prep.data_type, list(prep.dims)) == (int32, [1, 1])
    llm = {t.name: t for t in configs["tensorrt_llm"].input}["min_tokens"]
    assert (llm.data_type, list(llm.dims), list(llm.reshape.shape), llm.optional) == (int32, [1], [], True)
    steps = {s.model_name: s for s in configs["ensemble"].ensemble_scheduling.step}
    assert steps["preprocessing"].input_map["MIN_TOKENS"] == "MIN_TOKENS"
    assert steps["preprocessing"].output_map["min_tokens"] == steps["tensorrt_llm"].input_map["min_tokens"]
    bls = {k: v.string_value for k, v in configs["af3"].parameters.items()}
    assert "MIN_TOKENS" in json.loads(bls["preprocessing_inputs"]) and "min_tokens" in json.loads(bls["llm_inputs"])


def check_table_dtype(configs, data_type, torch_dtype):
    """The prompt table's one dtype: prompt_table's output (and its `dtype` parameter) = the ensemble's
    tensor between the two steps = the LLM's input."""
    out = {t.name: t for t in configs["prompt_table"].output}["prompt_embedding_table"]
    into = {t.name: t for t in configs["tensorrt_llm"].input}["prompt_embedding_table"]
    assert (out.data_type, into.data_type) == (data_type, data_type)
    assert configs["prompt_table"].parameters["dtype"].string_value == torch_dtype
    steps = {s.model_name: s for s in configs["ensemble"].ensemble_scheduling.step}
    assert steps["prompt_table"].output_map["prompt_embedding_table"] == \
        steps["tensorrt_llm"].input_map["prompt_embedding_table"]
    bls = {k: v.string_value for k, v in configs["af3"].parameters.items()}  # af3 passes prompt_table's on
    assert "prompt_embedding_table" not in json.loads(bls["llm_inputs"])


def conversation(prompt=PROMPT, audio=SPEECH_WAV):
    content = ([{"type": "audio", "audio": audio}] if audio is not None else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------ repository configs


def fake_engine_dir(tiny_dir, root, dtype="bfloat16"):
    """An engine dir whose TensorRT artifacts are stand-in files (config generation only); `dtype`: the
    LLM engine's pretrained_config.dtype (bfloat16, as `af3trt build`'s default precision makes it)."""
    from af3trt.formats.encoder_io import update_config
    from af3trt.formats.manifest import Manifest
    from af3trt.formats.encoder_io import IO
    from af3trt.spec import ModelSpec

    spec = ModelSpec.from_dir(tiny_dir)
    (root / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        shutil.copy2(tiny_dir / name, root / "tokenizer" / name)
    (root / "encoder").mkdir()
    (root / "encoder" / "encoder.plan").write_bytes(b"stand-in plan")
    update_config(root / "encoder", io=IO.describe(spec.text.hidden_size, "float32"),
                  plan={"profile": {"min": 1, "opt": 20, "max": 40}, "precision": "fp16",
                        "io": {"features": "FLOAT", "frames": "INT64", "embeddings": "HALF"}})
    (root / "llm" / "engine").mkdir(parents=True)
    (root / "llm" / "checkpoint").mkdir()
    (root / "llm" / "engine" / "config.json").write_text(json.dumps(
        {"pretrained_config": {"vocab_size": spec.text.vocab_size, "dtype": dtype},
         "build_config": {"max_batch_size": 4, "plugin_config": {"use_paged_context_fmha": True}}}))
    limits = {"max_batch_size": 4, "max_audio_seconds": 600.0, "max_input_len": 17048, "max_new_tokens": 2048,
              "max_seq_len": 19096}
    Manifest(checkpoint={"path": str(tiny_dir)}, limits=limits, precision={"llm": "bf16"},
             model={"vocab_size": spec.text.vocab_size, "hidden_size": spec.text.hidden_size,
                    "audio_token_id": spec.audio_token_id},
             stages={"llm_checkpoint": {"path": "llm/checkpoint", "vocab_size": spec.text.vocab_size}}).write(root)
    return root


def test_cpu_repository_configs(cpu_repo):
    configs = parse_repository(cpu_repo.path)
    llm = configs["tensorrt_llm"]
    assert llm.backend == "python" and llm.model_transaction_policy.decoupled
    assert [t.name for t in llm.input] == [t.name for t in LLM_INPUTS]
    assert [t.name for t in llm.output] == [t.name for t in LLM_OUTPUTS]
    assert configs["audio_encoder"].backend == "python" and configs["af3"].model_transaction_policy.decoupled
    steps = configs["ensemble"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocessing", "audio_encoder", "prompt_table", "tensorrt_llm",
                                            "postprocessing"]
    for step in steps:  # every mapped tensor exists on the model it is mapped to
        model = configs[step.model_name]
        assert set(step.input_map) <= {t.name for t in model.input}, step.model_name
        assert set(step.output_map) <= {t.name for t in model.output}, step.model_name
    check_min_tokens(configs)
    assert (cpu_repo.path / MARKER).is_file()


@pytest.fixture(scope="module")
def prod_repo(tiny_dir, tmp_path_factory):
    engine = fake_engine_dir(tiny_dir, tmp_path_factory.mktemp("prod") / "engine")
    return engine, write_repository(engine, engine.parent / "repo", llm_backend="tensorrtllm", streaming=True)


def test_production_repository(prod_repo, cpu_repo, tmp_path):
    from tritonclient.grpc import model_config_pb2

    engine, repo = prod_repo
    configs = parse_repository(repo.path)
    llm = configs["tensorrt_llm"]
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert llm.backend == "tensorrtllm" and llm.max_batch_size == 4 and llm.model_transaction_policy.decoupled
    assert params["gpt_model_path"] == str(engine.resolve() / "llm" / "engine")
    assert params["gpt_model_type"] == "inflight_fused_batching" and params["enable_kv_cache_reuse"] == "true"
    assert params["exclude_input_in_output"] == "true" and params["batch_scheduler_policy"] == "guaranteed_no_evict"
    # read without a default by the 1.2 backend (model_instance_state.cc): absent, the model fails to load
    assert all(params[k] == "" for k in ("tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path"))
    inputs = {t.name: t for t in llm.input}
    assert inputs["prompt_embedding_table"].data_type == model_config_pb2.TYPE_BF16  # the bfloat16 engine's
    assert inputs["prompt_table_extra_ids"].data_type == model_config_pb2.TYPE_UINT64
    assert "prompt_vocab_size" in inputs and "end_id" in inputs and "pad_id" in inputs
    for name in ("presence_penalty", "frequency_penalty"):  # the C++ backend's names: FP32 [1] -> [], optional
        t = inputs[name]
        assert (t.data_type, list(t.dims), list(t.reshape.shape), t.optional) == (model_config_pb2.TYPE_FP32, [1], [], True)
    steps = {st.model_name: st for st in configs["ensemble"].ensemble_scheduling.step}
    assert steps["preprocessing"].output_map["presence_penalty"] == steps["tensorrt_llm"].input_map["presence_penalty"]
    assert "STOP" not in {t.name for t in configs["ensemble"].input} and "STOP" in {t.name for t in configs["af3"].input}
    assert {"FINISH_REASON", "PROMPT_TOKENS", "AUDIO_TOKENS", "COMPLETION_TOKENS", "WARNINGS"} <= \
        {t.name for t in configs["af3"].output}
    check_table_dtype(configs, model_config_pb2.TYPE_BF16, "bfloat16")
    check_min_tokens(configs)  # the C++ backend's min_tokens, as its inflight_batcher_llm config names it
    python_llm = parse_config(cpu_repo.path / "tensorrt_llm" / "config.pbtxt")
    check_table_dtype(parse_repository(cpu_repo.path), model_config_pb2.TYPE_FP16, "float16")
    # same tensors either backend, but for the table's dtype (the engine's; FP16 for the python LLM)
    untyped = [(n, model_config_pb2.TYPE_FP16 if n == "prompt_embedding_table" else d, *rest)
               for n, d, *rest in io_signature(llm.input)]
    assert untyped == io_signature(python_llm.input)
    assert io_signature(llm.output) == io_signature(python_llm.output)
    enc = configs["audio_encoder"]
    assert enc.platform == "tensorrt_plan" and enc.max_batch_size == 40
    assert (repo.path / "audio_encoder" / "1" / "model.plan").resolve() == (engine / "encoder" / "encoder.plan").resolve()
    table = {t.name: t for t in configs["prompt_table"].input}["embeddings"]
    assert table.data_type == model_config_pb2.TYPE_FP16 and list(table.dims) == [-1, 750, 128]
    mounted = write_repository(engine, tmp_path / "repo2", server_engine_dir="/models/af3")
    params = {k: v.string_value for k, v in parse_config(mounted.path / "tensorrt_llm" / "config.pbtxt")
              .parameters.items()}
    assert params["gpt_model_path"] == "/models/af3/llm/engine"


def _import_model(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stub_backend_utils(monkeypatch):
    stub = types.ModuleType("triton_python_backend_utils")
    stub.TritonError = type("TritonError", (Exception,), {})
    stub.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    return stub


def test_python_models_work_without_tensorrt(prod_repo, cpu_repo, monkeypatch):
    """The production repository's python models import and initialize where TensorRT is absent."""
    from google.protobuf import json_format

    _stub_backend_utils(monkeypatch)
    before = set(sys.modules)
    _, repo = prod_repo
    paths = sorted(repo.path.glob("*/1/model.py"))
    assert [p.parent.parent.name for p in paths] == ["af3", "postprocessing", "preprocessing", "prompt_table"]
    for path in paths + [cpu_repo.path / "tensorrt_llm" / "1" / "model.py"]:
        name = path.parent.parent.name
        model = _import_model(path, f"af3trt_test_{name}").TritonPythonModel()
        if path in paths:
            config = json_format.MessageToDict(parse_config(path.parent.parent / "config.pbtxt"),
                                               preserving_proto_field_name=True)
            model.initialize({"model_config": json.dumps(config)})
            getattr(model, "finalize", lambda: None)()
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("tensorrt", "tensorrt_llm")}


def _stub_tensors(stub):
    """pb_utils.Tensor, InferenceResponse, get_input_tensor_by_name and Logger on `stub`, in memory:
    DLPack in and out as the python backend does it (torch), numpy only where numpy has the dtype."""
    from torch.utils.dlpack import from_dlpack, to_dlpack

    class Tensor:
        def __init__(self, name, array):
            self._name, self.value = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            if not isinstance(self.value, np.ndarray):
                raise TypeError("Tensor dtype is BF16 and cannot be converted to NumPy")
            return self.value

        def to_dlpack(self):
            import torch

            value = torch.from_numpy(self.value) if isinstance(self.value, np.ndarray) else self.value
            return to_dlpack(value)

        @classmethod
        def from_dlpack(cls, name, capsule):
            return cls(name, from_dlpack(capsule))

    stub.Tensor = Tensor
    stub.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(
        tensors={t.name(): t for t in output_tensors or ()}, error=error)
    stub.get_input_tensor_by_name = lambda request, name: request.get(name)
    stub.Logger = types.SimpleNamespace(log_error=lambda message: None)
    return Tensor


def _prompt_table_model(repo, name, dtype=None):
    """`repo`'s prompt_table model, initialized from its config.pbtxt (`dtype` replacing its parameter)."""
    from google.protobuf import json_format

    config = json_format.MessageToDict(parse_config(repo / "prompt_table" / "config.pbtxt"),
                                       preserving_proto_field_name=True)
    if dtype is not None:
        config["parameters"]["dtype"]["string_value"] = dtype
    model = _import_model(repo / "prompt_table" / "1" / "model.py", name).TritonPythonModel()
    model.initialize({"model_config": json.dumps(config)})
    return model


def test_prompt_table_gathers_valid_rows(cpu_repo, monkeypatch):
    import torch

    _stub_backend_utils(monkeypatch)
    gather = _import_model(cpu_repo.path / "prompt_table" / "1" / "model.py", "af3trt_test_gather").gather_rows
    emb = torch.arange(2 * 750 * 3, dtype=torch.float32).reshape(2, 750, 3)
    table = gather(emb, [750, 4], 3, torch.float16)
    assert table.shape == (1, 754, 3) and table.dtype == torch.float16 and table.is_contiguous()
    torch.testing.assert_close(table[0, 750:], emb[1, :4].to(torch.float16))
    assert gather(emb[:1], [0], 3, torch.bfloat16).shape == (1, 1, 3)  # text only: one unread zero row
    with pytest.raises(ValueError, match="expected embeddings"):
        gather(emb, [750], 3, torch.float16)


def test_prompt_table_model_emits_the_configured_dtype(cpu_repo, prod_repo, monkeypatch):
    """execute(): FP16 / FP32 / BF16 tables of the same rows, handed over through DLPack (BF16 has no
    numpy); the production repository's model (a bfloat16 engine) is configured for BF16."""
    import torch

    Tensor = _stub_tensors(_stub_backend_utils(monkeypatch))
    emb = np.random.default_rng(0).standard_normal((3, 750, 128)).astype(np.float16)
    request = {"embeddings": Tensor("embeddings", emb), "rows": Tensor("rows", np.array([750, 0, 17], np.int32))}
    want = torch.from_numpy(np.concatenate([emb[0], emb[2, :17]])[None])
    tables = {}
    for dtype in ("float16", "float32", "bfloat16"):
        model = _prompt_table_model(cpu_repo.path, f"af3trt_test_table_{dtype}", dtype)
        (resp,) = model.execute([request])
        assert resp.error is None, resp.error
        table = resp.tensors["prompt_embedding_table"].value  # what from_dlpack received
        assert isinstance(table, torch.Tensor) and table.shape == (1, 767, 128)
        assert table.dtype == getattr(torch, dtype)
        assert resp.tensors["prompt_vocab_size"].as_numpy().tolist() == [[767]]
        tables[dtype] = table
    torch.testing.assert_close(tables["float16"], want, rtol=0, atol=0)
    torch.testing.assert_close(tables["float32"], want.float(), rtol=0, atol=0)
    torch.testing.assert_close(tables["bfloat16"], want.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(tables["bfloat16"].float(), tables["float32"], rtol=2 ** -8, atol=0)
    _, repo = prod_repo
    assert _prompt_table_model(repo.path, "af3trt_test_table_prod").dtype == torch.bfloat16
    (resp,) = _prompt_table_model(repo.path, "af3trt_test_table_bad").execute(
        [{**request, "rows": Tensor("rows", np.array([750, 0], np.int32))}])
    assert "expected embeddings (W=2, 750, 128)" in str(resp.error)
    with pytest.raises(ValueError, match=r"expected dtype in .*got 'int8'"):
        _prompt_table_model(cpu_repo.path, "af3trt_test_table_int8", "int8")


@pytest.mark.parametrize("dtype, data_type", [("bfloat16", "TYPE_BF16"), ("float16", "TYPE_FP16"),
                                              ("float32", "TYPE_FP32")])
def test_prompt_table_dtype_is_the_engines(tiny_dir, tmp_path, dtype, data_type):
    """The executor refuses a prompt table whose dtype is not the engine's (promptTuningBuffers.cpp): the
    C++ backend's repository carries the table in the engine's dtype from prompt_table to the LLM; the
    python LLM's in FP16 whatever the engine (it reads the table with as_numpy)."""
    from tritonclient.grpc import model_config_pb2

    engine = fake_engine_dir(tiny_dir, tmp_path / "engine", dtype)
    repo = write_repository(engine, tmp_path / "repo", llm_backend="tensorrtllm")
    check_table_dtype(parse_repository(repo.path), model_config_pb2.DataType.Value(data_type), dtype)
    repo = write_repository(engine, tmp_path / "python", llm_backend="python")
    check_table_dtype(parse_repository(repo.path), model_config_pb2.TYPE_FP16, "float16")


@pytest.mark.parametrize("dtype", ["int8", "fp8", None])
def test_unsupported_engine_dtype_is_an_error(tiny_dir, tmp_path, dtype):
    engine = fake_engine_dir(tiny_dir, tmp_path / "engine", dtype)
    with pytest.raises(ValueError, match=r"expected pretrained_config\.dtype in \['bfloat16', 'float16', 'float32'\] "
                                         rf"in .*llm/engine/config.json .*got {dtype!r}"):
        write_repository(engine, tmp_path / "repo", llm_backend="tensorrtllm")
    assert not (tmp_path / "repo").exists()
    write_repository(engine, tmp_path / "python", llm_backend="python")  # the python LLM: FP16 whatever the engine


def test_writer_errors(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="llm/engine/config.json"):
        write_repository(tiny_dir, tmp_path / "r1", llm_backend="tensorrtllm")
    with pytest.raises(ValueError, match="expected llm_backend"):
        write_repository(tiny_dir, tmp_path / "r2", llm_backend="vllm")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not replacing"):
        write_repository(tiny_dir, tmp_path / "other", llm_backend="python")
    engine = fake_engine_dir(tiny_dir, tmp_path / "engine")
    with pytest.raises(ValueError, match=r"max_batch_size <= 4"):
        write_repository(engine, tmp_path / "r3", max_batch_size=8)
    assert ServingLimits.from_engine_dir(engine).max_batch_size == 4


# -------------------------------------------------------------------------------- real server


@pytest.mark.triton_server
def test_repository_loads(server):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(server.http_url)
    index = {m["name"]: m.get("state") for m in c.get_model_repository_index()}
    assert index == {name: "READY" for name in MODELS}, index


@pytest.mark.triton_server
@pytest.mark.parametrize("model", ["af3", "ensemble"])
def test_http_matches_pipeline(client, engine_pipe, model):
    expected = engine_pipe.generate(conversation(), do_sample=False, max_new_tokens=MAX_TOKENS)[0].text
    got = client.generate(PROMPT, SPEECH_WAV, model=model, do_sample=False, max_tokens=MAX_TOKENS)
    print(f"expected {expected!r}\ngot      {got!r}")
    assert got == expected


@pytest.mark.triton_server
def test_grpc_streaming_matches_pipeline(client, engine_pipe):
    expected = list(engine_pipe.stream(conversation(), do_sample=False, max_new_tokens=MAX_TOKENS))
    pieces = list(client.stream(PROMPT, SPEECH_WAV, do_sample=False, max_tokens=MAX_TOKENS))
    print(f"expected {expected}\ngot      {pieces}")
    assert len(pieces) > 1 and pieces == expected


@pytest.mark.triton_server
@pytest.mark.parametrize("model", ["af3", "ensemble"])
def test_repetition_penalty_with_audio_and_the_checkpoint_defaults(client, engine_pipe, model):
    """REPETITION_PENALTY with audio answers (the penalty's history holds the `<sound>` id, not the
    fake ids), as the in-process pipeline does; a request without options takes the checkpoint's
    generation_config (sampling): seeded, it is reproducible."""
    for penalty in (1.05, 1.3):
        expected = engine_pipe.generate(conversation(), do_sample=False, repetition_penalty=penalty,
                                        max_new_tokens=MAX_TOKENS)[0].text
        got = client.generate(PROMPT, SPEECH_WAV, model=model, do_sample=False, repetition_penalty=penalty,
                              max_tokens=MAX_TOKENS)
        print(f"repetition_penalty {penalty}: expected {expected!r}, got {got!r}")
        assert got == expected
    sampled = [client.generate(PROMPT, SPEECH_WAV, model=model, seed=4, max_tokens=MAX_TOKENS) for _ in range(2)]
    expected = engine_pipe.generate(conversation(), seed=4, max_new_tokens=MAX_TOKENS)[0].text
    print(f"sampled with seed 4: expected {expected!r}, got {sampled}")
    assert sampled[0] == sampled[1] == expected


@pytest.mark.triton_server
def test_text_only_request(client, engine_pipe):
    expected = engine_pipe.generate(conversation("What is the weather?", None), do_sample=False, max_new_tokens=MAX_TOKENS)[0].text
    assert client.infer("What is the weather?", do_sample=False, max_tokens=MAX_TOKENS) == expected
    assert client.infer("What is the weather?", do_sample=False, max_tokens=MAX_TOKENS, model="ensemble") == expected


@pytest.mark.triton_server
@pytest.mark.parametrize("model", ["af3", "ensemble"])
@pytest.mark.parametrize("prompt, audio, tokens, held", [(PROMPT, SPEECH_WAV, 6, False), ("hello", None, 12, True)])
def test_min_tokens_fixes_the_length(client, engine_pipe, model, prompt, audio, tokens, held):
    """MIN_TOKENS = MAX_TOKENS: exactly that many tokens, the in-process min_new_tokens answer. Text-only
    "hello" ends by itself before 12 tokens (`held`): there MIN_TOKENS is what holds the end back."""
    free = engine_pipe.generate(conversation(prompt, audio), do_sample=False, max_new_tokens=tokens)[0]
    fixed = engine_pipe.generate(conversation(prompt, audio), do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)[0]
    assert len(fixed.token_ids) == tokens and (len(free.token_ids) < tokens) == held
    got = client.generate(prompt, audio, model=model, do_sample=False, max_tokens=tokens, min_tokens=tokens)
    print(f"free     {free.text!r}\nexpected {fixed.text!r}\ngot      {got!r}")
    assert got == fixed.text and (got != free.text) == held
    assert client.infer(prompt, audio, model=model, do_sample=False, max_tokens=tokens, min_tokens=tokens) == fixed.text


def _outputs(client, **request):
    """af3's answer over gRPC: (joined TEXT, {FINISH_REASON, PROMPT_TOKENS, AUDIO_TOKENS, COMPLETION_TOKENS})."""
    stream = request.pop("stream", False)
    text, final = [], {}
    for result in client.responses(client.inputs(stream=stream, **request)):
        if result.as_numpy("TEXT") is not None:
            text += [t.decode() for t in result.as_numpy("TEXT").reshape(-1)]
        for name in ("FINISH_REASON", "PROMPT_TOKENS", "AUDIO_TOKENS", "COMPLETION_TOKENS"):
            if result.as_numpy(name) is not None:
                value = result.as_numpy(name).reshape(-1)[0]
                final[name] = value.decode() if isinstance(value, bytes) else int(value)
    return "".join(text), final


@pytest.mark.triton_server
def test_conversation_with_every_option_matches_pipeline(client, engine_pipe):
    """CONVERSATION (system, two user turns with an audio each, an assistant turn) with penalties, stop
    strings and ignore_eos: af3's TEXT, FINISH_REASON and token counts are Pipeline.generate's."""
    from af3trt.audio import synthetic_audio

    a, b = synthetic_audio(1.5, 61), synthetic_audio(2.5, 62)
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "audio", "audio": a}, {"type": "text", "text": "First?"}]},
            {"role": "assistant", "content": "A tone."},
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "audio", "audio": b}]}]
    base = dict(do_sample=False, presence_penalty=0.4, frequency_penalty=0.2, repetition_penalty=1.1)
    free = engine_pipe.generate(conv, max_new_tokens=24, **base)[0]
    stop = free.text[len(free.text) // 2:][:2]
    assert stop.strip(), free.text
    cases = [({}, {}), ({"stop": [stop, "never"]}, {"stop": [stop, "never"]}),
             ({"ignore_eos": True}, {"ignore_eos": True})]
    for sent, opts in cases:
        want = engine_pipe.generate(conv, max_new_tokens=24, **base, **opts)[0]
        for stream in (False, True):
            got, final = _outputs(client, conversation=conv, max_tokens=24, stream=stream, **base, **sent)
            print(sent, stream, repr(got), final, "| want", repr(want.text), want.finish_reason)
            assert got == want.text
            assert final == {"FINISH_REASON": "length" if want.finish_reason == "length" else "stop",
                             "PROMPT_TOKENS": want.prompt_tokens, "AUDIO_TOKENS": want.num_audio_tokens,
                             "COMPLETION_TOKENS": len(want.token_ids)}
        if "stop" in opts:
            assert want.finish_reason == "stop_string" and len(want.text) < len(free.text)


@pytest.mark.triton_server
def test_conversation_and_option_refusals(client):
    """The request's new form and options, refused with what was expected and what came."""
    import tritonclient.grpc as grpcclient

    from af3trt.serving.client import RequestFailed

    def fails(match, inputs, model="af3"):
        with pytest.raises(RequestFailed, match=match):
            list(client.stream_inputs(inputs, model=model))

    conv = [{"role": "user", "content": [{"type": "audio", "audio": SPEECH_WAV}, {"type": "text", "text": "Hi"}]}]
    both = client.inputs(conversation=conv)
    both.append(client.inputs("hello")[0])  # PROMPT too
    fails(r"expected PROMPT \(text\) or CONVERSATION \(JSON messages\), exactly one, got both", both)
    bad_json = grpcclient.InferInput("CONVERSATION", [1], "BYTES")
    bad_json.set_data_from_numpy(np.array([b"[{"], np.object_))
    fails(r"expected CONVERSATION as JSON messages, got invalid JSON", [bad_json])
    extra = client.inputs(conversation=conv)
    extra[[t.name() for t in extra].index("AUDIO")] = client.inputs("x", [SPEECH_WAV, SPEECH_WAV])[2]
    fails(r"CONVERSATION: expected every AUDIO element referenced by an audio item of the conversation, got "
          r"AUDIO\[1\] unreferenced", extra)
    no_audio = [t for t in client.inputs(conversation=conv) if t.name() != "AUDIO"]
    fails(r"CONVERSATION: expected message 0 item 0 audio as an index into AUDIO, got 0 and no AUDIO", no_audio)
    for model in ("af3", "ensemble"):
        fails(r"this repository's LLM tensors carry no \['MIN_P'\]", client.inputs("hi", do_sample=True, min_p=0.1),
              model)
        fails(r"expected PRESENCE_PENALTY a finite number", client.inputs("hi", presence_penalty=float("nan")), model)
    fails(r"unexpected inference input 'STOP'", client.inputs("hi", stop=["x"]), "ensemble")


@pytest.mark.triton_server
def test_preprocessing_min_tokens(client, server):
    """preprocessing passes MIN_TOKENS on as the LLM's min_tokens, 0 when the request has none."""
    import tritonclient.grpc as grpcclient

    grpc = grpcclient.InferenceServerClient(server.grpc_url)

    def min_tokens(**params):
        out = grpc.infer("preprocessing", client.inputs("hello", **params),
                         outputs=[grpcclient.InferRequestedOutput("min_tokens")])
        return out.as_numpy("min_tokens").tolist()

    assert min_tokens(max_tokens=8) == [[0]] and min_tokens(max_tokens=8, min_tokens=8) == [[8]]


@pytest.mark.triton_server
def test_concurrent_clients(client, server):
    from af3trt.audio import synthetic_audio

    audios = [synthetic_audio(s, seed=i) for i, s in enumerate((0.8, 3.0, 7.5, 31.0))]  # 31 s: two windows
    jobs = [(a, f"Describe audio {i}.") for i, a in enumerate(audios)]
    sequential = [client.infer(p, a, do_sample=False, max_tokens=8) for a, p in jobs]
    results, errors = {}, []

    def worker(w):  # even clients talk to af3, odd ones to the ensemble
        try:
            for k in range(4):
                a, p = jobs[(w + k) % len(jobs)]
                got = client.infer(p, a, do_sample=False, max_tokens=8, model="af3" if w % 2 == 0 else "ensemble")
                results[(w, k)] = (got, sequential[(w + k) % len(jobs)])
        except Exception as exc:  # collected and reported below
            errors.append(f"client {w}: {exc}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 32 and all(got == want for got, want in results.values())
    assert server.alive() and server.is_ready()


@pytest.mark.triton_server
def test_extra_ids_identify_audio(client, server, engine_pipe):
    """prompt_table_extra_ids: one positive id per audio on its fake ids, equal for equal samples."""
    import soundfile as sf
    import tritonclient.grpc as grpcclient

    from af3trt.audio import synthetic_audio

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    samples, rate = sf.read(SPEECH_WAV, dtype="int16")
    flac = io.BytesIO()
    sf.write(flac, samples, rate, format="FLAC")

    def run(audio):
        inputs = [t for t in client.inputs(PROMPT, audio) if t.name() in ("PROMPT", "AUDIO")]
        out = grpc.infer("preprocessing", inputs, outputs=[grpcclient.InferRequestedOutput(n)
                                                           for n in ("prompt_table_extra_ids", "input_ids")])
        return out.as_numpy("prompt_table_extra_ids")[0], out.as_numpy("input_ids")[0]

    wav_ids, ids = run(SPEECH_WAV)
    fake = ids >= engine_pipe.spec.text.vocab_size
    assert fake.any() and ((wav_ids > 0) == fake).all() and len(set(wav_ids[fake].tolist())) == 1
    np.testing.assert_array_equal(run(flac.getvalue())[0], wav_ids)  # same samples, other container
    two, ids = run([SPEECH_WAV, synthetic_audio(1.0)])
    assert len(set(two[ids >= engine_pipe.spec.text.vocab_size].tolist())) == 2


@pytest.mark.triton_server
@pytest.mark.parametrize("model", ["af3", "ensemble"])
def test_benchmark_triton_backend(server, model):
    """`af3trt bench --backends triton` against this server: probe, concurrent streamed requests, TTFT."""
    from af3trt.benchmark.backends import TritonBackend, conversations
    from af3trt.benchmark.latency import summarize

    models = types.SimpleNamespace(triton_url=server.http_url, triton_grpc_url=server.grpc_url, triton_model=model)
    backend = TritonBackend(models)
    assert backend.unavailable() is None
    print(backend.description)  # what the server runs, from its own model configs
    assert "the server runs tensorrt_llm: python on " in backend.description
    assert "audio_encoder: python (onnxruntime) on " in backend.description
    backend.setup()
    call = backend.run(conversations(2.0, 2), 8)
    assert 0 < call.ttft <= call.total and call.decode == pytest.approx(call.total - call.ttft)
    assert call.new_tokens == 8  # MIN_TOKENS = MAX_TOKENS: the server fixes the length
    row = summarize([call], seconds=2.0, batch=2, new_tokens=8)  # per-token figures as for the other backends
    assert row["tpot_ms"]["p50"] == pytest.approx(call.decode / 7 * 1e3)
    assert row["throughput"]["decode_tokens_per_s"] == pytest.approx(2 * 7 / call.decode)


@pytest.mark.triton_server
def test_serve_refuses_taken_ports(server, cpu_repo):
    """A second `af3trt serve` on the ports of a running server exits non-zero with one clear line, and
    never says ready; readiness counts only from a process that holds the ports itself."""
    from af3trt.serving.server import TritonServer, TritonServerError, free_port, owns_port

    proc = subprocess.run([sys.executable, "-m", "af3trt.cli", "serve", "--repo", str(cpu_repo.path),
                           "--http-port", str(server.http_port), "--grpc-port", str(server.grpc_port),
                           "--metrics-port", str(free_port())], capture_output=True, text=True, timeout=120)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 2 and "ready" not in proc.stdout
    assert f"af3trt serve: error: expected free ports for tritonserver, got HTTP {server.http_url} " in proc.stderr
    assert f"gRPC {server.grpc_url} " in proc.stderr and "Traceback" not in proc.stderr
    assert owns_port(server.process.pid, server.http_port) and owns_port(server.process.pid, server.grpc_port)
    assert owns_port(server.process.pid, free_port()) is False and owns_port(os.getpid(), server.http_port) is False
    impostor = subprocess.Popen(["sleep", "60"])  # alive, "ready" through the fixture's ports, owns none
    try:
        with pytest.raises(TritonServerError, match=rf"expected this tritonserver \(pid {impostor.pid}\) listening on "
                                                    rf"HTTP {server.http_url}, got another process answering there"):
            TritonServer(impostor, cpu_repo.path, server.host, server.http_port, server.grpc_port, None).wait_ready(30)
    finally:
        impostor.kill()
        impostor.wait()


LONG = dict(max_tokens=500, min_tokens=500)  # a fixed-length answer, long enough to abandon midway


def _timed(work):
    start = time.monotonic()
    out = work()
    return out, time.monotonic() - start


@pytest.mark.triton_server
def test_closed_stream_frees_the_server(client):
    """Closing `Af3Client.stream()` after 3 pieces cancels its gRPC stream and, through `af3`, the LLM
    request: closing returns at once and the next request is not held behind the abandoned answer."""
    pieces, full = _timed(lambda: list(client.stream("hello", **LONG)))
    assert len(pieces) > 3
    stream = client.stream("hello", **LONG)
    assert len([next(stream) for _ in range(3)]) == 3
    _, close = _timed(stream.close)
    answer, after = _timed(lambda: client.infer("hello", max_tokens=4))
    print(f"whole answer {full:.2f} s; close {close:.2f} s; next request {after:.2f} s")
    assert answer and close < full / 3 and after < full / 3


CLIENT = """
import sys
from af3trt.serving.client import Af3Client
stream = Af3Client(grpc_url=sys.argv[1]).stream("hello", max_tokens=500, min_tokens=500)
for i, _ in enumerate(stream):
    if i == 2:
        print("3 pieces", flush=True)
        sys.stdin.readline()  # killed here
"""


@pytest.mark.triton_server
def test_killed_client_frees_the_server(client, server):
    """A client killed mid-stream leaves no request running: the next one is not held behind it."""
    _, full = _timed(lambda: client.infer("hello", **LONG))
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.grpc_url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "3 pieces"
    finally:
        proc.kill()
        proc.wait(30)
    answer, after = _timed(lambda: client.infer("hello", max_tokens=4))
    print(f"whole answer {full:.2f} s; next request after the kill {after:.2f} s")
    assert answer and after < full / 3


def _wav(seconds):
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 16_000), np.int16), 16_000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.triton_server
@pytest.mark.parametrize("model", ["af3", "ensemble"])
def test_bad_requests(client, server, model):
    import tritonclient.grpc as grpcclient

    from af3trt.serving.client import RequestFailed

    def fails(match, inputs):
        with pytest.raises(RequestFailed, match=match):
            list(client.stream_inputs(inputs, model=model))

    fails(r"AUDIO\[0\]: expected a WAV, FLAC, MP3 or OGG file", client.inputs(PROMPT, b"not audio at all" * 8))
    fails(r"expected AUDIO\[0\] as the bytes of an audio file, got 0 bytes", client.inputs(PROMPT, b""))
    fails(r"expected AUDIO\[0\] of at most 60 s \(the engine's limit; `af3trt build --max-audio-seconds` raises "
          r"it, up to 600 s\), got 660.0 s", client.inputs(PROMPT, _wav(660)))
    fails(r"expected at most 60 s of audio per request .*, got 80.0 s in 2 files", client.inputs(PROMPT, [_wav(40)] * 2))
    fails(r"expected at most 2048 prompt tokens \(engine limit; `af3trt build --max-audio-seconds / --max-text-tokens` "
          r"raises it\), got \d+", client.inputs("hello world " * 1500, SPEECH_WAV))
    fails(r"expected at most 1024 text tokens besides audio \(engine limit; `af3trt build --max-text-tokens` raises "
          r"it\), got \d+", client.inputs("hello world " * 600, SPEECH_WAV))
    fails(r"expected at most 512 MAX_TOKENS \(engine limit; `af3trt build --max-new-tokens` raises it\), got 100000",
          client.inputs(PROMPT, SPEECH_WAV, max_tokens=100000))
    fails(r"expected MIN_TOKENS an integer in \[0, MAX_TOKENS=8\], got 9",
          client.inputs(PROMPT, SPEECH_WAV, max_tokens=8, min_tokens=9))
    fails(r"expected MIN_TOKENS an integer in \[0, MAX_TOKENS=\d+\], got -1", client.inputs(PROMPT, min_tokens=-1))
    fails(r"expected TEMPERATURE a finite number > 0, got inf", client.inputs(PROMPT, temperature=float("inf")))
    fails(r"expected DO_SAMPLE=True with \{'TEMPERATURE': 0.5\} .*got DO_SAMPLE=False from the call",
          client.inputs(PROMPT, do_sample=False, temperature=0.5))
    fails(r"expected PROMPT \(text\) or CONVERSATION \(JSON messages\), exactly one, got none",
          [t for t in client.inputs(PROMPT, SPEECH_WAV) if t.name() != "PROMPT"])
    wrong = grpcclient.InferInput("MAX_TOKENS", [1], "FP32")
    wrong.set_data_from_numpy(np.array([8.0], np.float32))
    fails(r"'MAX_TOKENS' data-type is 'FP32', but model '\w+' expects 'INT32'",
          [t for t in client.inputs(PROMPT, SPEECH_WAV) if t.name() != "MAX_TOKENS"] + [wrong])
    assert client.infer(PROMPT, SPEECH_WAV, model=model, do_sample=False, max_tokens=4)
    assert server.alive()


@pytest.mark.triton_server
@pytest.mark.parametrize("model", ["af3", "ensemble"])
def test_unknown_request_keys_are_refused(client, server, model):
    """The generate endpoint turns a JSON key that names no input (the typo MAX_TOKEN) into a request
    parameter: refused with the key named, over HTTP and gRPC alike, never answered as if absent."""
    import urllib.error
    import urllib.request

    import tritonclient.grpc as grpcclient

    body = json.dumps({"PROMPT": "hello", "MAX_TOKEN": 4}).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=120)
    message = json.loads(info.value.read())["error"]
    print(message)
    assert info.value.code == 400 and "got unknown keys ['MAX_TOKEN']" in message and "'MAX_TOKENS'" in message
    results = []
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    grpc.start_stream(callback=lambda result, error: results.append(error))
    grpc.async_stream_infer(model, client.inputs("hello", max_tokens=4), parameters={"temprature": 0.5},
                            enable_empty_final_response=True)
    grpc.stop_stream()
    assert any(e is not None and "got unknown keys ['temprature']" in str(e) for e in results), results
    assert client.generate("hello", model=model, max_tokens=4)


@pytest.mark.triton_server
def test_af3_answers_warnings(client):
    """A truncated MP3 decodes to what it holds, and `af3` says so in WARNINGS (first when streaming,
    beside TEXT otherwise), which the client raises as ServerWarning; a whole file has none."""
    import warnings

    import soundfile as sf

    from af3trt.serving.client import ServerWarning

    buf = io.BytesIO()
    sf.write(buf, np.sin(np.arange(5 * 16_000) / 20).astype(np.float32) * 0.3, 16_000, format="MP3")
    mp3 = buf.getvalue()
    match = r"AUDIO\[0\]: audio <\d+ bytes>: decoded \d\.\d\d s of the 5\.00 s its header declares"
    with pytest.warns(ServerWarning, match=match):
        assert client.generate(PROMPT, mp3[: len(mp3) // 2], max_tokens=4)
    with pytest.warns(ServerWarning, match=match):
        assert list(client.stream(PROMPT, mp3[: len(mp3) // 2], max_tokens=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ServerWarning)
        assert client.generate(PROMPT, mp3, max_tokens=4) and list(client.stream(PROMPT, mp3, max_tokens=4))
    # the streaming ensemble cannot carry WARNINGS (a decoupled ensemble's outputs come from one decoupled
    # model): it refuses what it would have to warn about, saying where the warnings are returned
    from af3trt.serving.client import RequestFailed

    for call in (lambda: client.generate(PROMPT, mp3[: len(mp3) // 2], model="ensemble", max_tokens=4),
                 lambda: list(client.stream(PROMPT, mp3[: len(mp3) // 2], model="ensemble", max_tokens=4))):
        with pytest.raises(RequestFailed, match=r"this repository's streaming ensemble cannot return WARNINGS .*"
                                                r"header declares.*send it to `af3`.*af3trt triton --no-streaming"):
            call()
    assert client.generate(PROMPT, mp3, model="ensemble", max_tokens=4)


class _Request(dict):
    """A stub python-backend request: its inputs by name, no parameters."""

    def parameters(self):
        return "{}"


def test_non_streaming_ensemble_returns_warnings(tiny_dir, tmp_path, monkeypatch):
    """Issue 16 item 3: a repository without streaming maps preprocessing's `warnings` ([0] when none) to
    the ensemble's WARNINGS; a streaming one has no WARNINGS output (Triton refuses outputs of two
    decoupled origins) and its preprocessing refuses what it would warn about, unless `af3` asks."""
    from google.protobuf import json_format

    stub = _stub_backend_utils(monkeypatch)
    Tensor = _stub_tensors(stub)
    engine = fake_engine_dir(tiny_dir, tmp_path / "engine")
    whole = io.BytesIO()
    import soundfile as sf

    sf.write(whole, np.sin(np.arange(5 * 16_000) / 20).astype(np.float32) * 0.3, 16_000, format="MP3")
    cut = whole.getvalue()[: len(whole.getvalue()) // 2]
    for streaming in (False, True):
        repo = write_repository(engine, tmp_path / f"repo-{streaming}", streaming=streaming).path
        configs = parse_repository(repo)
        outputs = [t.name for t in configs["ensemble"].output]
        steps = {st.model_name: st for st in configs["ensemble"].ensemble_scheduling.step}
        assert outputs == (["TEXT"] if streaming else ["TEXT", "WARNINGS"])
        assert steps["preprocessing"].output_map.get("warnings") == (None if streaming else "WARNINGS")
        config = json_format.MessageToDict(configs["preprocessing"], preserving_proto_field_name=True)
        pre = _import_model(repo / "preprocessing" / "1" / "model.py", f"af3trt_test_warn_{streaming}").TritonPythonModel()
        pre.initialize({"model_config": json.dumps(config)})

        def request(audio, **extra):
            return _Request(PROMPT=Tensor("PROMPT", np.array([PROMPT.encode()], np.object_)),
                            AUDIO=Tensor("AUDIO", np.array([audio], np.object_)), **extra)

        assert pre._process(request(whole.getvalue()))["warnings"].shape == (0,)
        asked = request(cut, returns_warnings=Tensor("returns_warnings", np.array([True])))
        notes = [w.decode() for w in pre._process(asked)["warnings"]]
        assert len(notes) == 1 and notes[0].startswith("AUDIO[0]: ") and "header declares" in notes[0]
        if streaming:
            with pytest.raises(Exception, match="streaming ensemble cannot return WARNINGS"):
                pre._process(request(cut))
        else:
            assert [w.decode() for w in pre._process(request(cut))["warnings"]] == notes
            # past the model's 10 minutes (this engine allows 600 s): truncated as the reference does, said so
            long = [w.decode() for w in pre._process(request(_wav(660)))["warnings"]]
            assert long == ["AUDIO[0]: audio <21120044 bytes> lasts 660.0 s; truncating to the first 600 s"], long


def test_stream_reaches_the_llm_only_when_it_is_decoupled(tiny_dir, tmp_path, monkeypatch):
    """A repository written with streaming=False has a non-decoupled LLM, which the C++ backend
    refuses streaming=true for: preprocessing sends STREAM=true on as false there."""
    from google.protobuf import json_format

    stub = _stub_backend_utils(monkeypatch)
    Tensor = _stub_tensors(stub)
    engine = fake_engine_dir(tiny_dir, tmp_path / "engine")
    for streaming in (True, False):
        repo = write_repository(engine, tmp_path / f"repo-{streaming}", streaming=streaming).path
        assert parse_config(repo / "tensorrt_llm" / "config.pbtxt").model_transaction_policy.decoupled == streaming
        config = json_format.MessageToDict(parse_config(repo / "preprocessing" / "config.pbtxt"),
                                           preserving_proto_field_name=True)
        model = _import_model(repo / "preprocessing" / "1" / "model.py", f"af3trt_test_pre_{streaming}")
        pre = model.TritonPythonModel()
        pre.initialize({"model_config": json.dumps(config)})
        request = {"STREAM": Tensor("STREAM", np.array([True])), "MAX_TOKENS": Tensor("MAX_TOKENS", np.array([4], np.int32))}
        assert pre._llm_tensors(request, pre._options(request))["streaming"].tolist() == [[streaming]]
