import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from af3trt.assets import SPEECH_WAV


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "af3trt.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_run_tiny_json(tmp_path):
    proc = run_cli("run", "--model", "tiny", "--audio", str(SPEECH_WAV), "--prompt", "Transcribe the input speech.",
                   "--json", "--max-new-tokens", "8", env_extra={"AF3TRT_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) >= {"text", "token_ids", "num_audio_tokens", "timings"}
    assert out["backends"] == {"encoder": "torch", "decoder": "torch"}  # a checkpoint dir on CPU
    assert "af3trt run: encoder torch (best available), decoder torch (best available)" in proc.stderr
    assert out["num_audio_tokens"] == 144 and 1 <= len(out["token_ids"]) <= 8
    from af3trt.tiny import default_tiny_dir

    assert (tmp_path / default_tiny_dir().name / "config.json").is_file()  # the cache key names the folder


def test_help_and_errors(tmp_path):
    assert run_cli("--help").returncode == 0
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    proc = run_cli("run", "--model", "tiny", "--audio", str(bad), env_extra={"AF3TRT_CACHE": str(tmp_path)})
    assert proc.returncode == 2 and "could not decode" in proc.stderr and "Traceback" not in proc.stderr


def test_stream_and_tiny_command(tmp_path):
    proc = run_cli("tiny", "--out", str(tmp_path / "t"), "--seed", "0")
    assert proc.returncode == 0 and (tmp_path / "t" / "model.safetensors").is_file()
    proc = run_cli("run", "--model", str(tmp_path / "t"), "--audio", str(SPEECH_WAV), "--stream",
                   "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr


def test_import_is_light():
    code = "import sys, af3trt, af3trt.cli; print(sorted(m for m in ('torch', 'tensorrt', 'tensorrt_llm', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


MODELS = {"preprocessing", "audio_encoder", "prompt_table", "tensorrt_llm", "postprocessing", "ensemble", "af3"}


def test_triton_command_writes_repository(engine_dir, tmp_path, capsys):
    from af3trt.cli import main

    repo = tmp_path / "repo"
    assert main(["triton", "--engine-dir", str(engine_dir), "--out", str(repo), "--llm-backend", "python"]) == 0
    out = capsys.readouterr().out
    assert {p.parent.name for p in repo.glob("*/config.pbtxt")} == MODELS
    assert str(repo.resolve()) in out and all(name in out for name in MODELS)
    assert 'backend: "python"' in (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    # --engine is an alias; a folder that is not an af3trt repository is not replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert main(["triton", "--engine", str(engine_dir), "--out", str(tmp_path / "other"), "--llm-backend", "python"]) == 2
    assert "not replacing" in capsys.readouterr().err
    # the default tensorrtllm backend needs the TensorRT-LLM engine, which this engine dir lacks here
    if not (engine_dir / "llm" / "engine" / "config.json").is_file():
        assert main(["triton", "--engine-dir", str(engine_dir), "--out", str(tmp_path / "r2")]) == 2
        assert "llm/engine/config.json" in capsys.readouterr().err


def test_serve_errors(tmp_path, capsys, monkeypatch):
    from af3trt.cli import main
    from af3trt.serving import server

    missing = tmp_path / "nonexistent"
    assert main(["serve", "--repo", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "expected a Triton model repository" in err and str(missing) in err and "Traceback" not in err

    def no_server():
        raise server.TritonServerError("expected `tritonserver` on PATH or the nvidia-pytriton wheel, found neither")

    monkeypatch.setattr(server, "find_tritonserver", no_server)
    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "config.pbtxt").write_text('name: "m"\n')
    assert main(["serve", "--repo", str(tmp_path / "repo")]) == 2
    assert "af3trt serve: error: expected `tritonserver` on PATH" in capsys.readouterr().err


def test_bench_shares_the_latency_parser(capsys):
    from af3trt.benchmark import cli as bench_cli
    from af3trt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: af3trt bench") and "--triton-url" in out
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"
    spec = importlib.util.spec_from_file_location("af3trt_test_latency_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main is bench_cli.main and script.build_parser is bench_cli.build_parser
    with pytest.raises(SystemExit) as exc:  # other commands still reject unknown arguments
        main(["tiny", "--out", "x", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_run_help_shows_the_models_generation_defaults(tiny_dir, capsys):
    from af3trt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", str(tiny_dir), "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "defaults: max_new_tokens=64, do_sample=True, temperature=0.7, top_k=20, top_p=0.8" in out
    assert "repetition_penalty=1.05" in out
