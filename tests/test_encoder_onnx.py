"""Encoder engine: ONNX export verified against the torch module, ModelOpt Q/DQ, TensorRT plan build.

CPU tests run everything but TensorRT; `build_plan`'s TensorRT calls are exercised against a
recording stand-in of the `tensorrt` module, and the `-m tensorrt` tests build and run real plans.
"""

import enum
import json
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from af3trt.audio import split_windows
from af3trt.build import encoder as enc
from af3trt.build.calibration import calibration_windows
from af3trt.checkpoint import Checkpoint
from af3trt.features import extract_features, log_mel, pad_windows
from af3trt.runtime.encoder import (OnnxRuntimeEncoder, TorchEncoder, available_encoders, load_encoder,
                                   valid_rows)
from af3trt.errors import MissingDependency
from af3trt.spec import TOKENS_PER_WINDOW, audio_token_count, audio_tokens_for_seconds
from af3trt.audio import synthetic_audio

from .test_prompt import CASES

INT8_MIN_COSINE = 0.98  # per valid row, INT8 Q/DQ vs the fp32 graph on the tiny model (measured ~0.99)


def windows(seconds: float, seed: int):
    f = extract_features([synthetic_audio(seconds, seed)])
    return f.features, f.valid_frames.astype(np.int64)


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    return enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path_factory.mktemp("engine") / "encoder")


@pytest.fixture(scope="module")
def torch_encoder(tiny_dir):
    return TorchEncoder.from_checkpoint(Checkpoint.open(tiny_dir))


@pytest.fixture(scope="module")
def int8_onnx(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "encoder.int8.onnx"
    return enc.quantize_onnx(engine.onnx_path, out, "int8", calibration_windows(count=4),
                             min_cosine=INT8_MIN_COSINE)


@pytest.mark.parametrize("seconds,count", [(30.0, 1), (75.5, 3), (597.3, 20)])
def test_onnxruntime_equals_torch(seconds, count, engine, torch_encoder):
    feats, frames = windows(seconds, seed=count)
    got = OnnxRuntimeEncoder(engine.onnx_path)(feats, frames)
    ref = torch_encoder(feats, frames)
    err = enc.relative_error(got, ref, frames)
    rows = valid_rows(frames)
    print(f"{count} windows, frames {frames.tolist()}: max relative error {err:.2e}")
    assert got.shape == ref.shape == (count, TOKENS_PER_WINDOW, 128)
    assert err <= 1e-4
    assert rows == [int(audio_token_count(int(f))) for f in frames]
    assert sum(rows) == audio_tokens_for_seconds(seconds)
    assert rows[-1] < TOKENS_PER_WINDOW or seconds % 30 == 0


def test_export_config_and_skip(engine, tiny_dir):
    cfg = enc.read_config(engine.onnx_path.parent)
    print(json.dumps(cfg["onnx"]["verification"]))
    assert cfg["io"]["inputs"]["frames"]["dtype"] == "int64"
    assert cfg["io"]["outputs"]["embeddings"]["shape"] == ["windows", TOKENS_PER_WINDOW, 128]
    assert cfg["onnx"]["checkpoint"]["fingerprint"] == Checkpoint.open(tiny_dir).fingerprint()
    assert cfg["onnx"]["verification"]["max_rel_error"] <= 1e-4
    again = enc.export_onnx(checkpoint=tiny_dir, out_dir=engine.onnx_path.parent)
    assert again.skipped and again.onnx_path == engine.onnx_path


def _scale_largest_weight(path, factor=1.05):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, str(path))


def test_export_raises_when_verification_mismatches(tiny_dir, tmp_path, monkeypatch):
    real = enc._export_graph

    def wrong_weight(module, path, *args):
        real(module, path, *args)
        _scale_largest_weight(path)

    monkeypatch.setattr(enc, "_export_graph", wrong_weight)
    with pytest.raises(enc.ExportVerificationError, match=r"max relative error .* expected <= 1e-04") as info:
        enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path / "encoder")
    print(info.value)
    assert not (tmp_path / "encoder").exists()
    assert list(tmp_path.iterdir()) == []


def test_external_data_round_trip(tiny_dir, tmp_path, torch_encoder, monkeypatch):
    result = enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path / "encoder", external_data=True)
    folder = tmp_path / "encoder"
    data = folder / "encoder.onnx.data"
    print(f"graph {result.onnx_path.stat().st_size} B, weights {data.stat().st_size} B")
    assert result.external_data and data.stat().st_size > 10 * result.onnx_path.stat().st_size
    assert enc.read_config(folder)["onnx"]["external_data"] == "encoder.onnx.data"
    assert {p.name: p.stat().st_mode & 0o777 for p in (folder, data, result.onnx_path, result.config_path)} == {
        "encoder": 0o755, "encoder.onnx.data": 0o644, "encoder.onnx": 0o644, "config.json": 0o644}
    feats, frames = windows(41.0, seed=9)
    got = load_encoder("onnxruntime", tmp_path)(feats, frames)
    assert enc.relative_error(got, torch_encoder(feats, frames), frames) <= 1e-4
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt()[0])
    plan = enc.build_plan(result.onnx_path, precision="fp16")
    assert plan.plan_path == folder / "encoder.plan" and enc.graph_facts(result.onnx_path).hidden == 128
    assert set(enc.read_config(folder)) == {"format", "format_version", "io", "onnx", "plan"}


def test_interrupted_export_leaves_no_partial_encoder(tiny_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("interrupted during verification")

    monkeypatch.setattr(enc, "_verify_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path / "fresh" / "encoder")
    assert list((tmp_path / "fresh").iterdir()) == []

    done = enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path / "kept" / "encoder", verify=False)
    before = done.config_path.read_text()
    with pytest.raises(KeyboardInterrupt):
        enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path / "kept" / "encoder", force=True)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["encoder"]
    assert done.config_path.read_text() == before and done.onnx_path.is_file()


def test_export_refuses_to_replace_a_foreign_folder(tiny_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="expected an empty folder or an earlier encoder export"):
        enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_int8_qdq_runs_on_onnxruntime_within_budget(engine, int8_onnx, torch_encoder):
    facts = enc.graph_facts(int8_onnx.onnx_path)
    f = extract_features([synthetic_audio(5.0, 21), synthetic_audio(44.0, 22)])
    frames = f.valid_frames.astype(np.int64)
    got = OnnxRuntimeEncoder(int8_onnx.onnx_path)(f.features, frames)
    lo, mean = enc.cosine_similarity(got, torch_encoder(f.features, frames), frames)
    print(f"int8 Q/DQ: cosine to fp32 min {lo:.4f} mean {mean:.4f} (held out); "
          f"at build: min {int8_onnx.cosine_min:.4f} mean {int8_onnx.cosine_mean:.4f}; budget {INT8_MIN_COSINE}")
    assert facts.qdq == "int8" and int8_onnx.calibration_windows == 4
    assert lo >= INT8_MIN_COSINE and int8_onnx.cosine_min >= INT8_MIN_COSINE
    assert enc.read_config(int8_onnx.onnx_path.parent)["quantized"]["int8"]["file"] == "encoder.int8.onnx"


def test_fp16_export_through_cli(tiny_dir, tmp_path, capsys, torch_encoder):
    out = str(tmp_path / "encoder")
    assert enc.main(["onnx", "--checkpoint", str(tiny_dir), "--out", out, "--dtype", "fp16"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = enc.read_config(tmp_path / "encoder")
    print("fp16 export:", cfg["onnx"]["verification"])
    assert result["dtype"] == "fp16" and cfg["io"]["outputs"]["embeddings"]["dtype"] == "float16"
    assert cfg["onnx"]["verification"]["max_rel_error"] <= 1e-2
    feats, frames = windows(33.0, seed=5)
    got = load_encoder("onnxruntime", tmp_path)(feats, frames)
    assert got.dtype == torch.float16
    assert enc.relative_error(got, torch_encoder(feats, frames), frames) <= 1e-2


def test_fp8_qdq_graph(engine, tmp_path):
    res = enc.quantize_onnx(engine.onnx_path, tmp_path / "encoder.fp8.onnx", "fp8", calibration_windows(count=2),
                            high_precision_dtype="fp32")
    print(f"fp8 Q/DQ on ONNX Runtime CPU: cosine to fp32 min {res.cosine_min:.4f} mean {res.cosine_mean:.4f}")
    assert enc.graph_facts(res.onnx_path).qdq == "fp8" and res.cosine_min >= 0.95
    with pytest.raises(ValueError, match="needs an int8 Q/DQ graph .* got an fp8 Q/DQ graph"):
        enc.build_plan(res.onnx_path, precision="int8")


def test_calibration_windows_from_folder_and_default(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "b.wav", synthetic_audio(31.0, 1), 16000)
    sf.write(tmp_path / "a.flac", synthetic_audio(4.0, 2), 16000)
    (tmp_path / "notes.txt").write_text("not audio")
    cal = calibration_windows(tmp_path, count=8)
    assert cal.sources == ("a.flac", "b.wav", "b.wav")
    assert cal.features.shape == (3, 128, 3000) and cal.frames.dtype == np.int64
    assert cal.frames.tolist() == [400, 3000, 100]
    default = calibration_windows(count=3)
    assert len(default) == 3 and default.sources[0] == "speech.wav"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected audio files"):
        calibration_windows(tmp_path / "empty")


@pytest.fixture(scope="module")
def ort_pipe(pipe, engine):
    from af3trt.runtime.pipeline import Pipeline

    return Pipeline(pipe.builder, OnnxRuntimeEncoder(engine.onnx_path), pipe.decoder, pipe.spec,
                    pipe.defaults, "cpu")


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_tokens_equal_with_onnxruntime_encoder(case, pipe, ort_pipe):
    ref = [r.token_ids for r in pipe.generate(CASES[case](), do_sample=False, max_new_tokens=8)]
    got = [r.token_ids for r in ort_pipe.generate(CASES[case](), do_sample=False, max_new_tokens=8)]
    print(case, "torch", ref, "onnxruntime", got)
    assert got == ref


def test_available_and_load_encoders(engine, tiny_dir):
    engine_dir = engine.onnx_path.parent.parent
    assert available_encoders(engine_dir) == ["onnxruntime", "torch"]
    assert available_encoders(tiny_dir) == ["torch"]
    assert load_encoder("auto", engine_dir).name == "onnxruntime"
    assert load_encoder("torch", tiny_dir).name == "torch"
    with pytest.raises(ValueError, match=r"expected encoder backend in \['auto', 'tensorrt'"):
        load_encoder("tflite", engine_dir)
    with pytest.raises(FileNotFoundError, match="needs the AF3 checkpoint"):
        load_encoder("torch", engine_dir)
    with pytest.raises(ValueError, match=r"expected features \(W, 128, 3000\)"):
        load_encoder("onnxruntime", engine_dir)(np.zeros((2, 128, 3000), np.float32), np.array([3000]))


# -- build_plan without TensorRT --------------------------------------------------------------------

def test_build_plan_without_tensorrt_raises_with_command(engine, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    out = engine.onnx_path.parent
    expected = (f"python -m af3trt.build.encoder plan --onnx {engine.onnx_path} --out {out} --precision fp16 "
                "--profile 1 4 20")
    with pytest.raises(MissingDependency, match="tensorrt") as info:
        enc.build_plan(engine.onnx_path, out, precision="fp16")
    print(info.value)
    assert expected in str(info.value)
    assert enc.main(["plan", "--onnx", str(engine.onnx_path), "--profile", "1", "2", "8"]) == 3
    assert "--profile 1 2 8" in capsys.readouterr().err


def test_build_plan_validates_before_tensorrt(engine, int8_onnx):
    with pytest.raises(ValueError, match=r"expected plan precision in \['bf16', 'fp16', 'fp32', 'fp8', 'int8'\]"):
        enc.build_plan(engine.onnx_path, precision="int4")
    with pytest.raises(ValueError, match="needs an int8 Q/DQ graph .* got a float graph without Q/DQ"):
        enc.build_plan(engine.onnx_path, precision="int8")
    with pytest.raises(ValueError, match="needs a float graph, got an int8 Q/DQ graph"):
        enc.build_plan(int8_onnx.onnx_path, precision="fp16")
    with pytest.raises(ValueError, match=r"1 <= min <= opt <= max, got \(2, 1, 4\)"):
        enc.build_plan(engine.onnx_path, profile=(2, 1, 4))


class FakeTensorRTMisuse(AssertionError):
    """A call the real TensorRT 10.13 Python bindings would reject (an unknown name, a wrong argument
    name or type) or that their documentation forbids."""


def _check(ok, what):
    if not ok:
        raise FakeTensorRTMisuse(what)


class FakeLayer:
    """An ILayer as `_keep_front_end_fp32` sees it (TensorRT 10.13 pyGraph.cpp): `name`, `num_outputs`,
    `get_output(index)`, the `precision` property and `set_output_type(index, dtype)`; the last two
    only on a weakly typed network ("Strongly-typed networks reject calls", NvInfer.h)."""

    def __init__(self, name, *dtypes):
        self.name, self._precision, self.output_types, self.network = name, None, {}, None
        self._outputs = [SimpleNamespace(name=f"{name}_output_{j}", dtype=d) for j, d in enumerate(dtypes)]

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_output(self, index):
        _check(isinstance(index, int) and 0 <= index < self.num_outputs, f"ILayer.get_output({index!r})")
        return self._outputs[index]

    @property
    def precision(self):
        return self._precision

    @precision.setter
    def precision(self, dtype):
        _check(not self.network.strongly_typed, "layer.precision on a strongly typed network")
        _check(isinstance(dtype, self.network.trt.DataType), f"layer.precision = {dtype!r} (expected a DataType)")
        self._precision = dtype

    def set_output_type(self, index, dtype):
        _check(not self.network.strongly_typed, "set_output_type on a strongly typed network")
        _check(isinstance(index, int) and 0 <= index < self.num_outputs, f"set_output_type({index!r}, ...)")
        _check(isinstance(dtype, self.network.trt.DataType), f"set_output_type(..., {dtype!r})")
        self.output_types[index] = dtype


def fake_tensorrt(parse_errors=(), serialized=b"PLAN", signal="features", cache_mismatch=False):
    """A recording stand-in for the `tensorrt` calls build_plan makes, with the TensorRT 10.13 Python
    bindings' names, argument names, enum values and return types (NVIDIA/TensorRT release/10.13,
    python/src/infer/pyCore.cpp, pyGraph.cpp, pyFoundationalTypes.cpp, parsers/pyOnnx.cpp): a wrong
    name or argument raises AttributeError/TypeError/FakeTensorRTMisuse as the real module would.
    signal: the network's first input (features | audio); serialized: the plan bytes (None = a failed
    build, logged as an ERROR); cache_mismatch: set_timing_cache returns False."""
    rec = SimpleNamespace(flags=[], cleared=[], shapes={}, network_flags=None, strongly_typed=None, cache_in=None,
                          pool=None, parsed=None, built=0)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.3.9"
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5,
                                             "FP8": 6, "BF16": 7, "INT64": 8, "INT4": 9, "FP4": 10, "E8M0": 11})
    trt.float32, trt.float16, trt.bfloat16 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16
    trt.int32, trt.int64, trt.int8 = trt.DataType.INT32, trt.DataType.INT64, trt.DataType.INT8
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {
        "EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {
        "FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
        "SPARSE_WEIGHTS": 7, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10, "FP8": 15,
        "ERROR_ON_TIMING_CACHE_MISS": 16, "BF16": 17, "STRIP_PLAN": 19, "INT4": 22, "FP4": 26})
    # trtexec (samples/common/sampleOptions.cpp, 10.13): "setting fp16 mode is not allowed if graph is strongly typed"
    type_flags = {trt.BuilderFlag[n] for n in ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4")}
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2,
                                                         "DLA_GLOBAL_DRAM": 3, "TACTIC_DRAM": 4,
                                                         "TACTIC_SHARED_MEMORY": 5})
    severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

    class ILogger:
        Severity = severity

        def __init__(self):
            self._trt_initialized = True  # pybind: a subclass that skips ILogger.__init__ fails on use

        def log(self, severity, msg):
            raise FakeTensorRTMisuse("ILogger.log is pure virtual: override it")

    trt.ILogger = ILogger

    class IProgressMonitor:  # pyCore.cpp: phase_start, step_complete, phase_finish are pure virtual
        def __init__(self):
            self._trt_initialized = True

    trt.IProgressMonitor = IProgressMonitor

    def logger_arg(logger):
        _check(isinstance(logger, ILogger) and getattr(logger, "_trt_initialized", False),
               f"expected an ILogger whose __init__ ran, got {logger!r}")
        return logger

    def dims(shape, what):
        _check(isinstance(shape, (tuple, list)) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape),
               f"{what}: expected a Dims (tuple/list of int), got {shape!r}")
        return tuple(shape)

    tensor = lambda name, dtype: SimpleNamespace(name=name, dtype=dtype)  # noqa: E731 (ITensor: name, dtype)
    rec.layers = [FakeLayer("/logmel/Cast", trt.int64), FakeLayer("/logmel/Pad", trt.float32),
                  FakeLayer("/logmel/Conv", trt.float32), FakeLayer("/logmel/MatMul", trt.float32),
                  FakeLayer("/encoder/conv1/Conv", trt.float32)]
    inputs = {signal: 3 if signal == "features" else 2, "frames": 1}  # rank of each network input

    class INetworkDefinition:
        def __init__(self, flags):
            self.trt = trt
            self.strongly_typed = bool(flags >> int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) & 1)
            self._inputs = [tensor(signal, trt.float32), tensor("frames", trt.int64)]
            self._outputs = [tensor("embeddings", trt.float32)]
            for layer in rec.layers:
                layer.network = self

        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))
        num_layers = property(lambda self: len(rec.layers))

        def get_input(self, index):
            return self._inputs[index]

        def get_output(self, index):
            return self._outputs[index]

        def get_layer(self, index):
            return rec.layers[index]

    class ParserError:
        def __init__(self, desc):
            self._desc = desc

        def desc(self):
            return self._desc

        def __str__(self):
            return self._desc

    class OnnxParser:
        def __init__(self, network, logger):
            _check(isinstance(network, INetworkDefinition), f"OnnxParser(network={network!r}, ...)")
            self._logger, self._errors = logger_arg(logger), []

        def parse_from_file(self, model):
            _check(isinstance(model, str), f"parse_from_file(model: str), got {type(model).__name__}")  # std::string
            import onnx

            rec.parsed = model
            self._errors = [ParserError(e) for e in parse_errors]
            # onnx-tensorrt WeightsContext::parseExternalWeights: a `location` is relative to the .onnx file's folder
            graph = onnx.load(model, load_external_data=False).graph
            for location in {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}:
                if ".." in Path(location).parts or not (Path(model).parent / location).is_file():
                    self._errors.append(ParserError(f"Failed to open file: {Path(model).parent / location}"))
            return not self._errors

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index):
            return self._errors[index]

    class ITimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return memoryview(b"CACHE")  # IHostMemory: a buffer, not bytes

    class IOptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 (the bindings' argument names)
            _check(isinstance(input, str), f"set_shape(input={input!r}, ...)")
            shapes = [dims(s, f"set_shape({input!r})") for s in (min, opt, max)]
            if len({len(s) for s in shapes}) > 1 or any(a > b for lo, hi in zip(shapes, shapes[1:])
                                                           for a, b in zip(lo, hi)):
                raise RuntimeError("Shape provided for min/opt/max is inconsistent with other shapes.")
            self.shapes[input] = rec.shapes[input] = tuple(shapes)

    class IBuilderConfig:
        def __init__(self):
            self.flags, self.profiles, self.cache = {trt.BuilderFlag.TF32}, [], None

        def set_flag(self, flag):
            _check(isinstance(flag, trt.BuilderFlag), f"set_flag(flag={flag!r}): expected a BuilderFlag")
            self.flags.add(flag)
            rec.flags.append(flag.name)

        def clear_flag(self, flag):
            _check(isinstance(flag, trt.BuilderFlag), f"clear_flag(flag={flag!r}): expected a BuilderFlag")
            self.flags.discard(flag)
            rec.cleared.append(flag.name)

        def set_memory_pool_limit(self, pool, pool_size):
            _check(isinstance(pool, trt.MemoryPoolType) and isinstance(pool_size, int) and pool_size >= 0,
                   f"set_memory_pool_limit({pool!r}, {pool_size!r})")
            rec.pool = (pool.name, pool_size)

        def add_optimization_profile(self, profile):
            _check(isinstance(profile, IOptimizationProfile), f"add_optimization_profile({profile!r})")
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            blob = bytes(memoryview(serialized_timing_cache))  # py::buffer: TypeError for str/None/Path
            rec.cache_in = blob
            return ITimingCache(blob) if blob in (b"", b"CACHE") else None  # unreadable blob: nullptr (assumed)

        def set_timing_cache(self, cache, ignore_mismatch):
            _check(isinstance(cache, ITimingCache) and isinstance(ignore_mismatch, bool),
                   f"set_timing_cache(cache={cache!r}, ignore_mismatch={ignore_mismatch!r})")
            self.cache = cache
            return not cache_mismatch

        def get_timing_cache(self):
            return self.cache

        @property
        def progress_monitor(self):
            return getattr(self, "_monitor", None)

        @progress_monitor.setter
        def progress_monitor(self, monitor):
            _check(isinstance(monitor, IProgressMonitor) and getattr(monitor, "_trt_initialized", False),
                   f"progress_monitor = {monitor!r}: expected an IProgressMonitor whose __init__ ran")
            self._monitor = monitor

    class Builder:
        def __init__(self, logger):
            self._logger = rec.logger = logger_arg(logger)

        def create_network(self, flags=0):
            _check(isinstance(flags, int) and not isinstance(flags, bool) and 0 <= flags < 1 << 4,
                   f"create_network(flags={flags!r}): expected a uint32 of NetworkDefinitionCreationFlag bits")
            network = INetworkDefinition(flags)
            rec.network_flags, rec.strongly_typed = flags, network.strongly_typed
            return network

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            _check(isinstance(network, INetworkDefinition) and isinstance(config, IBuilderConfig),
                   f"build_serialized_network({network!r}, {config!r})")
            _check(not (network.strongly_typed and config.flags & type_flags),
                   f"type BuilderFlags {sorted(f.name for f in config.flags & type_flags)} on a strongly typed network")
            _check(len(config.profiles) == 1 and set(config.profiles[0].shapes) == set(inputs)
                   and all(len(config.profiles[0].shapes[n][0]) == r for n, r in inputs.items()),
                   f"expected one optimization profile with shapes for {inputs}, "
                   f"got {[p.shapes for p in config.profiles]}")
            rec.built += 1
            monitor = config.progress_monitor
            if monitor is not None:  # two phases, one nested, as TensorRT reports them (names of 10.x builds)
                monitor.phase_start("Building engine", None, 2)
                monitor.phase_start("Tactic selection", "Building engine", 3)
                for step in range(3):
                    if not monitor.step_complete("Tactic selection", step):
                        monitor.phase_finish("Tactic selection")
                        monitor.phase_finish("Building engine")
                        return None  # a cancelled build returns nullptr
                monitor.phase_finish("Tactic selection")
                monitor.step_complete("Building engine", 0)
                monitor.phase_finish("Building engine")
            if serialized is None:
                self._logger.log(severity.ERROR, "fake: no implementation obeys reformatting-free rules")
                return None
            return memoryview(serialized)  # IHostMemory: a buffer, not bytes

    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    return trt, rec


def test_build_plan_tensorrt_calls(engine, int8_onnx, tmp_path, monkeypatch, capsys):
    trt, rec = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    res = enc.build_plan(engine.onnx_path, tmp_path / "fp16", precision="fp16", profile=(1, 2, 4),
                         timing_cache=cache, workspace_gib=2)
    assert "encoder_plan: Building engine: done in " in capsys.readouterr().err  # through the progress monitor
    assert (res.plan_path.read_bytes(), cache.read_bytes(), rec.cache_in) == (b"PLAN", b"CACHE", b"")
    assert rec.flags == ["FP16"] and rec.network_flags == 0 and not res.strongly_typed
    assert rec.cleared == [] and all(layer.precision is None for layer in rec.layers)  # features graph: TF32 allowed
    assert rec.shapes == {"features": ((1, 128, 3000), (2, 128, 3000), (4, 128, 3000)),
                          "frames": ((1,), (2,), (4,))}
    assert rec.pool == ("WORKSPACE", 2 << 30)
    assert rec.parsed == str(engine.onnx_path.resolve())
    plan = enc.read_config(tmp_path / "fp16")["plan"]
    assert plan["profile"] == {"min": 1, "opt": 2, "max": 4} and plan["io"]["frames"] == "INT64"
    assert enc.build_plan(engine.onnx_path, tmp_path / "fp16", precision="fp16", profile=(1, 2, 4)).skipped
    enc.build_plan(engine.onnx_path, tmp_path / "fp16", precision="fp16", profile=(1, 2, 4), timing_cache=cache,
                   force=True)
    assert rec.cache_in == b"CACHE"

    rec.flags.clear()
    res = enc.build_plan(int8_onnx.onnx_path, tmp_path / "int8", precision="int8")
    assert res.strongly_typed and rec.network_flags == 1 << 1 and rec.strongly_typed and rec.flags == []
    assert res.profile == (1, 4, 20)
    res = enc.build_plan(engine.onnx_path, tmp_path / "fp32", precision="fp32", profile=(1, 2, 4))
    assert res.strongly_typed and rec.strongly_typed and rec.flags == []


def test_build_plan_raises_every_parser_error_and_failed_build(engine, tmp_path, monkeypatch):
    trt, _ = fake_tensorrt(parse_errors=("In node 3 (Where): bad type", "In node 9 (Range): unsupported"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(enc.PlanBuildError, match=r"2 error\(s\):\n  In node 3 .*\n  In node 9") as info:
        enc.build_plan(engine.onnx_path, tmp_path, precision="fp16")
    print(info.value)
    trt, rec = fake_tensorrt(serialized=None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(enc.PlanBuildError, match="build_serialized_network returned None.*reformatting-free"):
        enc.build_plan(engine.onnx_path, tmp_path, precision="bf16")
    assert not (tmp_path / "encoder.plan").exists() and rec.flags == ["BF16"] and rec.built == 1
    for garbage, mismatch in ((b"not a timing cache", False), (b"CACHE", True)):
        (tmp_path / "timing.cache").write_bytes(garbage)
        trt, rec = fake_tensorrt(cache_mismatch=mismatch)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        with pytest.raises(enc.PlanBuildError, match="rejected the timing cache"):
            enc.build_plan(engine.onnx_path, tmp_path, precision="fp16", timing_cache=tmp_path / "timing.cache")
        assert rec.built == 0


def test_ctrl_c_in_the_progress_monitor_cancels_the_plan_build(engine, tmp_path, monkeypatch):
    """A KeyboardInterrupt inside a monitor callback (where the signal lands while TensorRT builds)
    makes step_complete return False; TensorRT then returns no plan and build_plan raises
    KeyboardInterrupt (the CLI's one "interrupted" line), not PlanBuildError."""
    from af3trt.build.encoder_plan import BuildProgress

    trt, rec = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)

    def interrupted(self, name, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(BuildProgress, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt, match="was cancelled"):
        enc.build_plan(engine.onnx_path, tmp_path / "fp16", precision="fp16", profile=(1, 2, 4))
    assert rec.built == 1 and not (tmp_path / "fp16" / "encoder.plan").exists()


def test_fake_tensorrt_rejects_what_the_bindings_reject(tmp_path):
    """The stand-in fails the misuses that build_plan must not make (so a CPU test would catch them)."""
    trt, rec = fake_tensorrt()
    logger = trt.ILogger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    config = builder.create_builder_config()
    with pytest.raises(FakeTensorRTMisuse, match="strongly typed"):
        rec.layers[1].precision = trt.float32
    with pytest.raises(FakeTensorRTMisuse, match="BuilderFlag"):
        config.set_flag("FP16")
    with pytest.raises(TypeError):
        config.set_timing_cache(config.create_timing_cache(b""))  # ignore_mismatch is required
    with pytest.raises(FakeTensorRTMisuse, match="str"):
        trt.OnnxParser(network, logger).parse_from_file(tmp_path / "encoder.onnx")
    with pytest.raises(AttributeError):
        trt.NetworkDefinitionCreationFlag.EXPLICT_BATCH  # noqa: B018
    config.set_flag(trt.BuilderFlag.FP16)
    with pytest.raises(FakeTensorRTMisuse, match=r"type BuilderFlags \['FP16'\] on a strongly typed network"):
        builder.build_serialized_network(network, config)

    class Unset(trt.ILogger):
        def __init__(self):  # forgets trt.ILogger.__init__(self)
            pass

    with pytest.raises(FakeTensorRTMisuse, match="ILogger"):
        trt.Builder(Unset())


# -- graphs that take padded 16 kHz windows (conv STFT log-mel inside the graph) ---------------------

@pytest.fixture(scope="module")
def audio_engine(tiny_dir, tmp_path_factory):
    return enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path_factory.mktemp("audio") / "encoder", inputs="audio")


def padded(seconds: float, seed: int):
    """Zero-padded 16 kHz windows of a synthetic audio, their reference log-mel and valid frames."""
    audio, mask = pad_windows(split_windows(synthetic_audio(seconds, seed)))
    return audio, log_mel(audio).numpy(), mask.sum(axis=1).astype(np.int64)


@pytest.mark.parametrize("seconds,count", [(30.0, 1), (75.5, 3)])
def test_audio_input_graph_equals_torch_on_the_reference_log_mel(seconds, count, audio_engine, torch_encoder):
    audio, feats, frames = padded(seconds, seed=count)
    ort_encoder = OnnxRuntimeEncoder(audio_engine.onnx_path)
    got = ort_encoder(audio, frames)
    err = enc.relative_error(got, torch_encoder(feats, frames), frames)
    print(f"audio input, {count} windows, frames {frames.tolist()}: max relative error {err:.2e} vs torch on the "
          f"reference log-mel (budget {enc.AUDIO_FP32_TOLERANCE:.0e}; the graph's log-mel is ~5e-5 off)")
    assert ort_encoder.takes == "audio" and got.shape == (count, TOKENS_PER_WINDOW, 128)
    assert count == 1 or frames[-1] < 3000  # the 3-window case ends with a partial window
    assert err <= enc.AUDIO_FP32_TOLERANCE


def test_audio_input_config_graph_and_refusals(audio_engine, engine, tiny_dir, tmp_path):
    import onnx

    cfg = enc.read_config(audio_engine.onnx_path.parent)
    print("audio-input export verification:", json.dumps(cfg["onnx"]["verification"]))
    assert cfg["io"]["takes"] == "audio" and enc.read_config(engine.onnx_path.parent)["io"]["takes"] == "features"
    assert cfg["io"]["inputs"]["audio"] == {"dtype": "float32", "shape": ["windows", 480000]}
    assert cfg["onnx"]["verification"]["tolerance"] == enc.AUDIO_FP32_TOLERANCE
    assert (enc.graph_facts(audio_engine.onnx_path).takes, enc.graph_facts(engine.onnx_path).takes) == ("audio",
                                                                                                       "features")
    nodes = onnx.load(str(audio_engine.onnx_path)).graph.node
    assert any(n.op_type == "Conv" and n.name.startswith(enc.FRONT_END_SCOPE) for n in nodes)
    feats, frames = windows(30.0, seed=1)
    with pytest.raises(ValueError, match=r"expected audio \(W, 480000\) and frames \(W,\), got audio \(1, 128, 3000\)"):
        OnnxRuntimeEncoder(audio_engine.onnx_path)(feats, frames)
    with pytest.raises(ValueError, match="expected a features-input encoder graph to quantize .* got an audio-input"):
        enc.quantize_onnx(audio_engine.onnx_path, precision="int8")
    with pytest.raises(ValueError, match=r"expected an encoder input kind in \('features', 'audio'\), got 'wav'"):
        enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path / "encoder", inputs="wav")


def test_build_plan_keeps_the_audio_front_end_fp32(audio_engine, tiny_dir, tmp_path, monkeypatch):
    trt, rec = fake_tensorrt(signal="audio")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    res = enc.build_plan(audio_engine.onnx_path, tmp_path / "fp16", precision="fp16", profile=(1, 2, 4))
    assert not res.strongly_typed and rec.cleared == ["TF32"]
    assert rec.flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    pinned = {layer.name: (layer.precision, layer.output_types) for layer in rec.layers if layer.precision is not None}
    assert pinned == {name: (trt.float32, {0: trt.float32}) for name in ("/logmel/Pad", "/logmel/Conv",
                                                                         "/logmel/MatMul")}
    assert rec.shapes == {"audio": ((1, 480000), (2, 480000), (4, 480000)), "frames": ((1,), (2,), (4,))}
    assert enc.read_config(tmp_path / "fp16")["plan"]["io"]["audio"] == "FLOAT"

    half = enc.export_onnx(checkpoint=tiny_dir, out_dir=tmp_path / "half", dtype="fp16", inputs="audio")
    print(f"fp16 audio-input export: max relative error {half.max_rel_error:.2e} (budget 1e-2)")
    trt, rec = fake_tensorrt(signal="audio")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    res = enc.build_plan(half.onnx_path, precision="fp16")  # strongly typed: the graph's float32 front end holds
    assert res.strongly_typed and rec.cleared == ["TF32"] and rec.flags == []
    assert all(layer.precision is None for layer in rec.layers)


def test_build_options_and_stage_keys_carry_the_encoder_input():
    from af3trt.build.engine_dir import ENCODER_INPUTS, BuildOptions, _stage_flags
    from af3trt.formats.encoder_io import INPUT_KINDS

    assert ENCODER_INPUTS == INPUT_KINDS
    with pytest.raises(ValueError, match=r"expected encoder input in \('features', 'audio'\), got 'wav'"):
        BuildOptions(encoder_input="wav")
    with pytest.raises(ValueError, match="expected encoder precision fp16 or bf16 with encoder input 'audio'"):
        BuildOptions(encoder_input="audio", encoder_precision="int8")
    audio, features = BuildOptions(encoder_input="audio"), BuildOptions()
    for stage in ("encoder_onnx", "encoder_plan"):
        assert _stage_flags(stage, audio) != _stage_flags(stage, features)
    assert _stage_flags("llm_checkpoint", audio) == _stage_flags("llm_checkpoint", features)


def test_engine_dir_with_an_audio_input_encoder(engine_dir, tiny_dir, tmp_path):
    """`af3trt build --encoder-input audio` over a copy of the tiny engine dir redoes only the encoder
    stages; its pipeline feeds ONNX Runtime the padded windows and gives the torch encoder's greedy
    tokens; the Triton repository refuses it."""
    from af3trt.formats.manifest import Manifest
    from af3trt.build.triton import write_repository
    from af3trt.cli import main
    from af3trt.runtime.pipeline import Pipeline

    out = tmp_path / "audio-engine"
    shutil.copytree(engine_dir, out)
    kept = Manifest.read(out).stages["llm_checkpoint"]
    assert main(["build", "--model", str(tiny_dir), "--out", str(out), "--encoder-input", "audio",
                 "--max-batch-size", "4", "--max-new-tokens", "512"]) == 0
    stages = Manifest.read(out).stages
    assert stages["encoder_onnx"]["inputs"] == "audio" and stages["llm_checkpoint"] == kept
    assert "--encoder-input audio" in stages["encoder_plan"].get("command", "--encoder-input audio")
    audio_pipe = Pipeline.from_pretrained(out, device="cpu", dtype="float32")
    torch_pipe = Pipeline.from_pretrained(out, encoder="torch", device="cpu", dtype="float32")
    assert (audio_pipe.encoder.name, audio_pipe.encoder.takes) == ("onnxruntime", "audio")
    for case in ("audio+text", "batch mixed lengths"):
        got = [r.token_ids for r in audio_pipe.generate(CASES[case](), do_sample=False, max_new_tokens=8)]
        ref = [r.token_ids for r in torch_pipe.generate(CASES[case](), do_sample=False, max_new_tokens=8)]
        print(case, "torch encoder", ref, "audio-input onnxruntime encoder", got)
        assert got == ref
    with pytest.raises(ValueError, match="the Triton repository supports features-input encoders only"):
        write_repository(out, tmp_path / "repo", llm_backend="python")


# -- real TensorRT (skip only where `tensorrt` cannot be imported) -----------------------------------

@pytest.mark.tensorrt
@pytest.mark.parametrize("precision,tolerance", [("fp32", 5e-3), ("fp16", 3e-2)])
def test_tensorrt_plan_matches_onnxruntime(precision, tolerance, engine, tmp_path):
    pytest.importorskip("tensorrt")
    from af3trt.runtime.encoder import TensorRTEncoder

    res = enc.build_plan(engine.onnx_path, tmp_path, precision=precision, profile=(1, 2, 4))
    trt_encoder = TensorRTEncoder(res.plan_path, "cuda")
    ort_encoder = OnnxRuntimeEncoder(engine.onnx_path)
    for seconds in (30.0, 75.5, 140.0):  # 1, 3 and 5 windows (5 > profile max 4: two chunks)
        feats, frames = windows(seconds, seed=int(seconds))
        got = trt_encoder(feats, frames)
        torch.cuda.synchronize()
        err = enc.relative_error(got.cpu(), ort_encoder(feats, frames), frames)
        print(f"{precision} plan, {len(frames)} windows: max relative error {err:.2e} (budget {tolerance})")
        assert got.is_cuda and err <= tolerance


@pytest.mark.tensorrt
def test_tensorrt_int8_plan_and_auto_backend(engine, int8_onnx, tmp_path):
    pytest.importorskip("tensorrt")
    import shutil

    res = enc.build_plan(int8_onnx.onnx_path, tmp_path, precision="int8", profile=(1, 2, 4))
    shutil.copy(engine.onnx_path, tmp_path / "encoder.onnx")
    assert available_encoders(tmp_path)[:2] == ["tensorrt", "onnxruntime"]
    trt_encoder = load_encoder("auto", tmp_path, "cuda")
    feats, frames = windows(75.5, seed=3)
    lo, mean = enc.cosine_similarity(trt_encoder(feats, frames).cpu(), OnnxRuntimeEncoder(engine.onnx_path)(
        feats, frames), frames)
    print(f"int8 plan ({res.tensorrt_version}): cosine to fp32 min {lo:.4f} mean {mean:.4f}")
    assert trt_encoder.name == "tensorrt" and lo >= INT8_MIN_COSINE


@pytest.mark.tensorrt
def test_tensorrt_encoder_checks_frames_and_runs_on_its_own_stream(engine, tmp_path):
    """As the ONNX Runtime encoder: 0 or > 3000 valid frames are refused; the plan runs on the
    encoder's own stream, never the caller's (issue 12, finding 8)."""
    pytest.importorskip("tensorrt")
    from af3trt.runtime.encoder import TensorRTEncoder

    res = enc.build_plan(engine.onnx_path, tmp_path, precision="fp16", profile=(1, 2, 4))
    trt_encoder = TensorRTEncoder(res.plan_path, "cuda")
    feats, frames = windows(30.0, seed=1)
    for bad in (0, 3001):
        with pytest.raises(ValueError, match=r"expected 1..3000 valid frames per window"):
            trt_encoder(feats, np.array([bad]))
    assert trt_encoder._stream.cuda_stream != torch.cuda.current_stream().cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # results are ordered on the caller's stream
        got = trt_encoder(feats, frames)
        ref = trt_encoder(feats, frames)
    side.synchronize()
    assert torch.equal(got, ref)
