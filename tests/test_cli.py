import json
import os
import subprocess
import sys

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
    assert out["num_audio_tokens"] == 144 and 1 <= len(out["token_ids"]) <= 8
    assert (tmp_path / "tiny-seed0" / "config.json").is_file()


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
