import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    for name, doc in [("gpu", "needs a CUDA GPU"), ("tensorrt", "needs the tensorrt module"),
                      ("trtllm", "needs the tensorrt_llm module"), ("triton_server", "starts a real tritonserver"),
                      ("slow", "heavy matrix (every precision at the odd vocab, ...): run with -m slow, as .ci/run does")]:
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only when -m names them (scripts/test.sh -m slow): the README's test command
    stays within its time on 2 cores."""
    if "slow" in (config.getoption("-m") or ""):
        return
    slow = [i for i in items if i.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if not i.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from af3trt.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def pipe(tiny_dir):
    from af3trt.runtime import Pipeline

    return Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf(tiny_dir):
    """transformers' AF3 model + processor on the tiny checkpoint (the reference; transformers >= 5)."""
    pytest.importorskip("transformers.models.audioflamingo3", reason="reference needs transformers >= 5")
    import torch
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def engine_dir(tiny_dir, tmp_path_factory):
    """`af3trt build` output for the tiny model (bf16 TensorRT-LLM checkpoint, ONNX encoder; the
    TensorRT stages are recorded as missing where tensorrt / tensorrt_llm are not installed)."""
    from af3trt.build.engine_dir import BuildOptions, build_engine_dir
    from af3trt.build.llm import EngineLimits

    out = tmp_path_factory.mktemp("engine") / "tiny-bf16"
    limits = EngineLimits(max_batch_size=4, max_text_tokens=2048, max_new_tokens=512)
    build_engine_dir(model=tiny_dir, out=out, options=BuildOptions(precision="bf16", limits=limits))
    return out


@pytest.fixture(scope="session")
def engine_pipe(engine_dir):
    """The in-process pipeline on `engine_dir` (ONNX Runtime encoder, torch decoder on llm/checkpoint)."""
    from af3trt.runtime import Pipeline

    return Pipeline.from_pretrained(engine_dir, device="cpu", dtype="float32")


# The CPU Triton repository's limits (lower than the engine dir's, so that the server's refusals show)
TRITON_LIMITS = dict(max_audio_seconds=60.0, max_input_len=2048, max_new_tokens=512, max_seq_len=4096,
                     max_text_tokens=1024)


@pytest.fixture(scope="session")
def cpu_repo(engine_dir, tmp_path_factory):
    """The CPU repository of `af3trt build --model tiny`'s engine dir (ONNX Runtime encoder, python LLM on
    llm/checkpoint): what the server tests serve, compared against `engine_pipe` on the same engine dir."""
    from af3trt.build.triton import ServingLimits, write_repository

    return write_repository(engine_dir, tmp_path_factory.mktemp("triton") / "repo", llm_backend="python",
                            streaming=True, limits=ServingLimits(**TRITON_LIMITS))


@pytest.fixture(scope="session")
def server(cpu_repo, tmp_path_factory):
    """ONE real tritonserver (nvidia-pytriton's binary) on 127.0.0.1 for the session: tests/test_triton.py's
    server tests and tests/test_openai.py's --triton-url mode share it (its start takes a minute)."""
    pytest.importorskip("pytriton", reason="the tritonserver binary comes from the nvidia-pytriton wheel")
    from af3trt.serving.server import start_server

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with start_server(cpu_repo.path, startup_timeout_s=300, log_path=log) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    from af3trt.serving.client import Af3Client

    return Af3Client(server.http_url, server.grpc_url, timeout_s=120)
