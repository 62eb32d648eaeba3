"""A Triton repository records the af3trt that wrote it, and one written by another af3trt is refused at
load (each python model's initialize, and the server launcher) with "regenerate it with `af3trt triton`".
Also the one Limits record (af3trt.formats.limits) the repository, the Pipeline and the manifest share."""

import json
import re

import pytest

import af3trt
from af3trt.build.triton import ServingLimits, write_repository
from af3trt.build.triton_spec import MARKER, VERSION_KEY, RepositoryVersionError, check_writer
from af3trt.errors import OptionError
from af3trt.formats.limits import Limits, request_limit_error
from af3trt.serving import server

from .test_triton import _import_model, _stub_backend_utils, parse_config


def _config(repo, name):
    from google.protobuf import json_format

    return json_format.MessageToDict(parse_config(repo / name / "config.pbtxt"), preserving_proto_field_name=True)


def test_repository_records_its_writer(engine_dir, tmp_path):
    repo = write_repository(engine_dir, tmp_path / "repo", llm_backend="python").path
    assert json.loads((repo / MARKER).read_text())["af3trt"] == af3trt.__version__
    for name in ("preprocessing", "postprocessing", "af3", "ensemble"):
        assert _config(repo, name)["parameters"][VERSION_KEY]["string_value"] == af3trt.__version__, name
    check_writer(repo)  # this af3trt's: accepted


def test_another_af3trts_repository_is_refused(engine_dir, tmp_path, monkeypatch):
    repo = write_repository(engine_dir, tmp_path / "repo", llm_backend="python").path
    record = json.loads((repo / MARKER).read_text())
    (repo / MARKER).write_text(json.dumps({**record, "af3trt": "0.0.1"}))
    with pytest.raises(RepositoryVersionError, match=re.escape("regenerate it with `af3trt triton`")) as exc:
        server._check_repo(repo)  # the launcher's check, before tritonserver starts
    print(exc.value)
    assert "0.0.1" in str(exc.value)

    pre = repo / "postprocessing" / "config.pbtxt"
    pre.write_text(pre.read_text().replace(f'string_value: "{af3trt.__version__}"', 'string_value: "0.0.1"'))
    _stub_backend_utils(monkeypatch)
    model = _import_model(repo / "postprocessing" / "1" / "model.py", "af3trt_test_post_version").TritonPythonModel()
    with pytest.raises(RepositoryVersionError, match=re.escape("regenerate it with `af3trt triton`")):
        model.initialize({"model_config": json.dumps(_config(repo, "postprocessing"))})


def test_limits_one_record():
    lim = Limits.read({"max_audio_tokens": 1500, "max_input_len": 3548, "max_windows": 20, "max_audio_seconds": 60})
    assert lim["max_audio_tokens"] == 1500 and lim.get("max_seq_len") is None and lim.max_audio_seconds == 60.0
    assert Limits.read(lim.record()) == lim and dict(lim) == lim.record()
    assert lim.request_error(audio_tokens=1501, prompt_tokens=1521) == request_limit_error(
        dict(lim), audio_tokens=1501, prompt_tokens=1521)
    with pytest.raises(OptionError, match="unknown keys"):
        Limits.read({"max_audio_token": 1})
    with pytest.raises(OptionError, match="max_seq_len > max_input_len"):
        Limits(max_input_len=10, max_seq_len=10)
    assert Limits() == Limits.read(None) and Limits().request_error(audio_tokens=10**6, prompt_tokens=10**6) is None
    serving = ServingLimits()
    assert isinstance(serving, Limits) and serving.max_batch_size == 8 and serving.max_text_tokens is None
    with pytest.raises(OptionError, match="ServingLimits.max_windows"):
        ServingLimits(max_windows=0)


def test_request_options_are_declared_once():
    """The request's option inputs are one table (triton_spec.OPTION_INPUTS) naming GenerationOptions
    fields; the request inputs, preprocessing's option map and the client's keywords derive from it."""
    from dataclasses import fields

    from af3trt.build.triton_spec import NUMPY_TO_TRITON, OPTION_INPUTS, REQUEST_INPUTS, REQUEST_OPTIONS
    from af3trt.runtime.generation import GenerationOptions
    from af3trt.serving.client import PARAMS

    assert {opt for opt, _ in OPTION_INPUTS.values()} <= {f.name for f in fields(GenerationOptions)}
    declared = {t.name: t.dtype for t in REQUEST_INPUTS}
    assert all(declared[name] == NUMPY_TO_TRITON[d] for name, (_, d) in OPTION_INPUTS.items())
    assert REQUEST_OPTIONS == {name: opt for name, (opt, _) in OPTION_INPUTS.items()}
    assert {name for name, _, _ in PARAMS.values()} == set(OPTION_INPUTS) | {"STRIP_PREFIX"}
