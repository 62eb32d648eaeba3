"""Serving applies the engine dir's own limits and weights (issue 12, findings 4 and 6): one
per-request rule for the Pipeline and Triton's preprocessing (prompt-table rows =
max_prompt_embedding_table_size // max_batch_size), and a repository never serves other LLM weights
than the engine dir's."""

import json
import shutil

import numpy as np
import pytest

from af3trt.formats.manifest import Manifest, ManifestError
from af3trt.build.triton import ServingLimits, write_repository
from af3trt.runtime import Pipeline
from af3trt.spec import audio_tokens_for_seconds
from af3trt.formats.limits import request_limit_error

from .test_triton import _import_model, _stub_backend_utils, _stub_tensors, _wav, parse_config

CLIP = 3.155  # s: 79 rows each; 19 clips = 59.9 s (within 60 s) but 1501 rows (over 1500)
SIXTY_S = ServingLimits(max_batch_size=10, max_audio_seconds=60.0, max_windows=20, max_audio_tokens=1500,
                        max_input_len=1500 + 2048, max_new_tokens=512, max_seq_len=1500 + 2048 + 512)


def test_the_engine_dir_limits_reach_serving(engine_dir):
    m = Manifest.read(engine_dir)
    lim = ServingLimits.from_engine_dir(engine_dir)
    print("manifest limits", m.limits, "serving", lim)
    assert (lim.max_audio_tokens, lim.max_windows) == (m.limits["max_audio_tokens"], m.limits["max_windows"])
    assert lim.max_audio_tokens == 15000 and lim.max_windows == 4 * 20  # batch 4 x 10 min: the plan's profile


def test_one_rule_for_rows(engine_pipe):
    rows = 19 * audio_tokens_for_seconds(CLIP)
    print(f"19 clips of {CLIP} s = {19 * CLIP:.2f} s -> {rows} rows")
    assert 19 * CLIP <= 60 and rows == 1501
    limits = {"max_audio_tokens": 1500, "max_input_len": 3548, "max_windows": 20}
    assert request_limit_error(limits, audio_tokens=rows, prompt_tokens=rows + 20, windows=19) == \
        "expected at most 1500 audio tokens (engine limit; `af3trt build --max-audio-seconds` raises it), got 1501"
    assert request_limit_error(limits, audio_tokens=1500, prompt_tokens=1520, windows=21) == \
        "expected at most 20 30 s windows (engine limit; `af3trt build --max-audio-seconds` raises it), got 21"
    assert request_limit_error(limits, audio_tokens=1500, prompt_tokens=1520, windows=19) is None


def _preprocessing(repo, monkeypatch):
    from google.protobuf import json_format

    Tensor = _stub_tensors(_stub_backend_utils(monkeypatch))
    config = json_format.MessageToDict(parse_config(repo / "preprocessing" / "config.pbtxt"),
                                       preserving_proto_field_name=True)
    model = _import_model(repo / "preprocessing" / "1" / "model.py", "af3trt_test_pre_rows").TritonPythonModel()
    model.initialize({"model_config": json.dumps(config)})
    return model, Tensor


def test_preprocessing_refuses_more_rows_than_the_executor_takes(engine_dir, tmp_path, monkeypatch):
    repo = write_repository(engine_dir, tmp_path / "repo", llm_backend="python", limits=SIXTY_S)
    model, Tensor = _preprocessing(repo.path, monkeypatch)

    class Request(dict):  # the tensors by name, and no request parameters
        def parameters(self):
            return "{}"

    def request(clips):
        return Request({"PROMPT": Tensor("PROMPT", np.array([b"Transcribe the input speech."], object)),
                        "AUDIO": Tensor("AUDIO", np.array([_wav(CLIP)] * clips, object))})

    with pytest.raises(Exception, match=r"expected at most 1500 audio tokens \(engine limit; .*\), got 1501"):
        model._process(request(19))
    out = model._process(request(18))  # 1422 rows: within the engine
    assert int(out["rows"].sum()) == 18 * audio_tokens_for_seconds(CLIP)


def _without_llm_stage(engine_dir, dst):
    shutil.copytree(engine_dir, dst)
    data = json.loads((dst / "manifest.json").read_text())
    del data["stages"]["llm_checkpoint"]  # an int4_awq build interrupted in calibration
    (dst / "manifest.json").write_text(json.dumps(data))
    shutil.rmtree(dst / "llm" / "checkpoint")
    return dst


def test_a_repository_never_serves_the_source_weights_in_place_of_a_missing_llm_stage(engine_dir, tmp_path, capsys):
    from af3trt.cli import main

    broken = _without_llm_stage(engine_dir, tmp_path / "e")
    message = r"expected stage 'llm_checkpoint' in .*, the build did not run it"
    with pytest.raises(ManifestError, match=message):
        Pipeline.from_pretrained(broken, device="cpu")
    with pytest.raises(ManifestError, match=message):
        write_repository(broken, tmp_path / "repo", llm_backend="python")
    assert main(["triton", "--engine-dir", str(broken), "--out", str(tmp_path / "repo2"),
                 "--llm-backend", "python"]) == 2
    assert "expected stage 'llm_checkpoint'" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() and not (tmp_path / "repo2").exists()
