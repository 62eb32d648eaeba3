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
