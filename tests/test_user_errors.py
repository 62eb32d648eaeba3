"""Errors as a user meets them: one base class (af3trt.errors.UserError) for everything a user can fix,
printed by the CLI as one line; internal errors print their traceback and say they are a bug; every
option is checked before a build stage runs; messages name the user's input, not af3trt's internals."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from af3trt.assets import SPEECH_WAV
from af3trt.cli import main
from af3trt.errors import MissingInputError, OptionError, UserError


def test_user_errors_share_one_base():
    from af3trt.audio import AudioError
    from af3trt.formats.manifest import ManifestError
    from af3trt.build.trtllm_flags import FlagError
    from af3trt.prompt import PromptError
    from af3trt.serving.server import TritonServerError

    for cls in (AudioError, PromptError, ManifestError, FlagError, OptionError, TritonServerError, MissingInputError):
        assert issubclass(cls, UserError), cls
    assert issubclass(MissingInputError, FileNotFoundError)  # callers catching the builtin keep working
    assert not issubclass(KeyError, UserError) and not issubclass(RuntimeError, UserError)


def _one_line(capsys, command):
    err = capsys.readouterr().err
    print(err)
    lines = [line for line in err.splitlines() if line.startswith(f"af3trt {command}: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_run_on_a_cpu_build_names_what_is_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AF3TRT_CACHE", str(tmp_path))
    assert main(["run", "--model", "tiny", "--audio", str(SPEECH_WAV), "--device", "cuda"]) == 2
    line = _one_line(capsys, "run")
    assert "expected a usable CUDA device for device 'cuda', got none" in line and "AssertionError" not in line
    assert main(["run", "--model", "tiny", "--audio", str(SPEECH_WAV), "--decoder", "tensorrt_llm"]) == 2
    line = _one_line(capsys, "run")
    assert "decoder backend 'tensorrt_llm' is not available here" in line
    assert "has no TensorRT-LLM engine" in line and ("TensorRT-LLM is not installed" in line or "CUDA" in line)


def test_bad_inputs_are_named(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AF3TRT_CACHE", str(tmp_path))
    assert main(["run", "--model", "tiny", "--audio", str(tmp_path)]) == 2
    assert _one_line(capsys, "run").endswith(f"expected an audio file, got a directory: {tmp_path}")
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "manifest.json").write_text("{not json")
    assert main(["run", "--model", str(engine), "--audio", str(SPEECH_WAV)]) == 2
    line = _one_line(capsys, "run")
    assert f"expected {engine / 'manifest.json'} to hold JSON" in line
    target = "/proc/af3trt-cannot-be-here"
    assert main(["tiny", "--out", target]) == 2
    line = _one_line(capsys, "tiny")
    assert f"expected a writable folder to create {target} in, got /proc" in line and ".tiny-" not in line


def test_internal_errors_print_the_traceback_and_say_bug(capsys, monkeypatch):
    import af3trt.cli as cli

    def broken(args):
        raise KeyError("an internal slip")

    monkeypatch.setattr(cli, "_cmd_tiny", broken)
    assert main(["tiny", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'an internal slip'" in err
    assert err.strip().splitlines()[-1].startswith("af3trt tiny: internal error: this is a bug in af3trt")

    def plain_value_error(args):  # a bare ValueError is not a user error any more
        raise ValueError("not the user's")

    monkeypatch.setattr(cli, "_cmd_tiny", plain_value_error)
    assert main(["tiny", "--out", "unused"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_build_options_fail_before_any_stage(capsys, tmp_path):
    out = tmp_path / "engine"
    start = time.monotonic()
    assert main(["build", "--model", "tiny", "--out", str(out), "--tp-size", "3"]) == 2
    assert "must divide by tp_size, got tp_size 3" in _one_line(capsys, "build")
    assert main(["build", "--model", "tiny", "--out", str(out), "--calib-audio", str(tmp_path / "missing_dir")]) == 2
    assert f"expected a folder of calibration audio, got {tmp_path / 'missing_dir'}" in _one_line(capsys, "build")
    print(f"refused in {time.monotonic() - start:.1f} s")
    assert not out.exists()  # nothing written, no stage run


def test_calibration_skips_a_file_it_cannot_decode(tmp_path):
    import soundfile as sf

    from af3trt.build.calibration import CalibrationFileSkipped, calibration_windows
    from af3trt.audio import synthetic_audio

    for i in range(3):
        sf.write(tmp_path / f"clip{i}.wav", synthetic_audio(2.0, seed=i), 16_000)
    (tmp_path / "clip1b.wav").write_bytes(b"")
    with pytest.warns(CalibrationFileSkipped, match=r"skipping .*clip1b\.wav: expected audio, got an empty file"):
        windows = calibration_windows(tmp_path, count=3)
    assert windows.sources == ("clip0.wav", "clip1.wav", "clip2.wav")
    for f in tmp_path.iterdir():
        f.write_bytes(b"")
    with pytest.raises(MissingInputError, match="expected usable audio in .*, got none of its 4 files decodable"), \
            pytest.warns(CalibrationFileSkipped):
        calibration_windows(tmp_path, count=3)


def test_ctrl_c_during_build_is_one_line(tmp_path):
    """SIGINT mid-build: exit 130, one line saying a rerun resumes, no KeyboardInterrupt traceback."""
    env = {**os.environ, "AF3TRT_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "af3trt.cli", "tiny", "--out", str(tmp_path / "tiny")], env=env,
                   check=True, capture_output=True, timeout=300)
    # SIGINT as a terminal delivers it, even where this test runs in a background job (SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "-m", "af3trt.cli", "build", "--model", str(tmp_path / "tiny"),
                             "--out", str(tmp_path / "engine")], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while "af3trt build:" not in seen:  # the progress bar: stages are running
        seen += proc.stderr.read(1)
        assert proc.poll() is None, seen
    proc.send_signal(signal.SIGINT)
    err = seen + proc.stderr.read()
    proc.stderr.close()
    proc.wait(60)
    print(err[-2000:])
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == ("af3trt build: interrupted; rerun the same command to resume "
                                            "(finished stages are kept)")


def test_manifest_errors_name_the_file(tmp_path):
    from af3trt.formats.manifest import Manifest, ManifestError

    (tmp_path / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ManifestError, match=r"expected a JSON object in .*manifest\.json, got list"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("")
    with pytest.raises(ManifestError, match=r"manifest\.json to hold JSON, got unreadable text"):
        Manifest.read(tmp_path)


def test_version_and_choices(capsys):
    from af3trt import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"af3trt {__version__}"
    with pytest.raises(SystemExit) as exc:
        main(["build", "--model", "tiny", "--out", "x", "--precision", "fp9"])
    assert exc.value.code == 2 and "invalid choice: 'fp9' (choose from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help lines wrap at the terminal's width
    assert "(default: 8000)" in out and "(default: 8001)" in out and "(default: None)" not in out


def test_truncation_is_said_once(recwarn, caplog):
    from af3trt.audio import AudioTruncatedWarning, load_audio
    from af3trt.spec import MAX_AUDIO_SAMPLES

    audio = load_audio(np.zeros(MAX_AUDIO_SAMPLES + 16_000, np.float32))
    assert [w.category for w in recwarn] == [AudioTruncatedWarning] and not caplog.records
    assert audio.truncated and audio.warnings == (str(recwarn[0].message),)


def test_random_weights_too_big_is_refused_with_the_figure(capsys, monkeypatch, tmp_path):
    """`bench --random-weights` estimates the weights first and refuses what cannot fit, instead of
    allocating until the OOM killer ends it."""
    from af3trt.benchmark import random_model

    monkeypatch.setattr(random_model, "available_bytes", lambda device: 2 * 10**9)  # a 2 GB host
    full = random_model.weight_bytes(random_model.full_spec(), __import__("torch").bfloat16)
    assert 16e9 < full < 18e9  # AF3: ~8.3 B parameters in bf16
    code = main(["bench", "--random-weights", "--backends", "torch", "--device", "cpu", "--dtype", "bfloat16",
                 "--audio-seconds", "10", "--no-floor", "--out", str(tmp_path / "r.json")])
    line = _one_line(capsys, "bench")
    assert code == 2 and "to fit on cpu: it needs ~18.2 GB, 2.0 GB are available; pass --scale < 1" in line


def test_third_party_output_goes_to_the_stage_log(tmp_path):
    """ModelOpt's prints and warnings during `af3trt build` land in ENGINE_DIR/logs/STAGE.log."""
    env = {**os.environ, "AF3TRT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "engine"
    proc = subprocess.run([sys.executable, "-m", "af3trt.cli", "build", "--model", "tiny", "--out", str(out),
                           "--stages", "llm"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    log = (out / "logs" / "llm_checkpoint.log").read_text()
    assert "current rank" in log and "current rank" not in terminal
    assert "modelopt" in log and "modelopt" not in terminal
    assert "llm_checkpoint: llm/checkpoint (built)" in proc.stdout
    again = subprocess.run([sys.executable, "-m", "af3trt.cli", "build", "--model", "tiny", "--out", str(out),
                            "--stages", "llm"], env=env, capture_output=True, text=True, timeout=600)
    assert "llm_checkpoint: llm/checkpoint (unchanged, skipped)" in again.stdout, again.stderr


def test_run_says_what_it_did_to_the_audio(capsys, tmp_path, monkeypatch):
    """A truncated MP3 through `af3trt run --json`: one warning line on stderr and the same note in
    the JSON's "warnings" (the server's WARNINGS); a whole file has none."""
    import soundfile as sf

    monkeypatch.setenv("AF3TRT_CACHE", str(tmp_path))
    whole, cut = tmp_path / "whole.mp3", tmp_path / "cut.mp3"
    sf.write(whole, np.sin(np.arange(5 * 16_000) / 20).astype(np.float32) * 0.3, 16_000, format="MP3")
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert main(["run", "--model", "tiny", "--audio", str(cut), "--max-new-tokens", "2", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1 and "its header declares" in out["warnings"][0]
    assert out["warnings"][0].startswith("AUDIO[0]: ")  # Result.warnings, worded as the server's WARNINGS
    assert captured.err.count("af3trt run: warning: ") == 1 and out["warnings"][0][len("AUDIO[0]: "):] in captured.err
    assert main(["run", "--model", "tiny", "--audio", str(whole), "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["warnings"] == []
