"""Progress inside long build stages and the build summary: the ONNX export's phase lines, the
TensorRT build's phases (BuildProgress, driven here by plain calls in place of TensorRT's
IProgressMonitor callbacks), trtllm-build's streamed lines, and `af3trt build`'s skipped / rebuilt /
left-for-TensorRT summary."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from af3trt.build.encoder_plan import BuildProgress
from af3trt.build.stage_log import phase, run_streamed, stage_output

REPO = Path(__file__).resolve().parents[1]
HAS_TRT = __import__("importlib").util.find_spec("tensorrt") is not None


def _build(out, tmp_path, *extra):
    env = {**os.environ, "AF3TRT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "af3trt.cli", "build", "--model", "tiny", "--out", str(out),
                           "--stages", "encoder", *extra], env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_tiny_build_shows_the_export_phases_and_the_summary(tmp_path):
    out = tmp_path / "e"
    first = _build(out, tmp_path)
    for line in ("encoder_onnx: tracing and exporting 0.3 M parameters", "encoder_onnx: saving the graph",
                 "encoder_onnx: onnx.checker.check_model", "encoder_onnx: ONNX Runtime session",
                 "encoder_onnx: ONNX Runtime vs torch: done in "):
        assert line in first.stderr, line
    assert "torch.onnx.export, opset 17: done in " in first.stderr
    assert "/4 [" in first.stderr  # the verification bar counts windows (1 + 3)
    assert "encoder_onnx: encoder/encoder.onnx (built)" in first.stdout
    again = _build(out, tmp_path, "--max-audio-seconds", "60")  # another max_windows: the export's key changes
    assert "tokenizer: tokenizer (unchanged, skipped)" in again.stdout
    assert "encoder_onnx: encoder/encoder.onnx (rebuilt: its flags or inputs changed)" in again.stdout
    summary = next(line for line in again.stdout.splitlines() if line.startswith("af3trt build: "))
    if HAS_TRT:
        assert "encoder_plan: encoder/encoder.plan (rebuilt: its flags or inputs changed)" in again.stdout
    else:
        assert "encoder_plan: left for a machine that has TensorRT (tensorrt is not installed here)" in again.stdout
        assert summary == ("af3trt build: skipped (unchanged): tokenizer; rebuilt: encoder_onnx; built: none; "
                           "left for a machine with TensorRT / TensorRT-LLM: encoder_plan")
    (out / "tokenizer" / "tokenizer.json").unlink()
    third = _build(out, tmp_path, "--max-audio-seconds", "60")
    assert "tokenizer: tokenizer (rebuilt: its outputs were damaged (tokenizer/tokenizer.json: missing))" in \
        third.stdout
    assert "encoder_onnx: encoder/encoder.onnx (unchanged, skipped)" in third.stdout
    assert "encoder_onnx: tracing" not in third.stderr


def test_plan_build_phases_show_steps_eta_and_their_time():
    """What the IProgressMonitor's callbacks draw: `encoder_plan: PHASE` bars with steps and ETA,
    nested phases under their parent, deeper ones not drawn, a `done in` line per top-level phase."""
    out = io.StringIO()
    progress = BuildProgress(file=out, mininterval=0)
    progress.phase_start("Building engine", None, 2)
    progress.phase_start("Tactic selection", "Building engine", 4)
    progress.phase_start("Layer timing", "Tactic selection", 9)
    assert progress.step_complete("Layer timing", 0) is True
    progress.phase_finish("Layer timing")
    for step in range(2):
        assert progress.step_complete("Tactic selection", step)
    progress.phase_finish("Tactic selection")
    progress.step_complete("Building engine", 0)
    progress.phase_finish("Building engine")
    text = out.getvalue()
    print(text)
    assert "encoder_plan: Building engine:  50%" in text and "1/2 [" in text
    assert "encoder_plan: Tactic selection:  50%" in text and "2/4 [00:00<" in text  # "<" precedes the ETA
    assert "Layer timing" not in text
    assert text.rstrip().endswith("encoder_plan: Building engine: done in 0.0 s")
    assert "Tactic selection: done" not in text


def test_plan_build_progress_cancels_on_ctrl_c_and_survives_its_own_errors():
    out = io.StringIO()
    progress = BuildProgress(file=out, mininterval=0)
    progress.phase_start("Building engine", None, 3)

    def interrupted(name, step):
        raise KeyboardInterrupt

    progress._step = interrupted
    assert progress.step_complete("Building engine", 0) is False and progress.cancelled
    progress.close()

    broken = BuildProgress(file=out, mininterval=0)
    broken._start = lambda *args: 1 / 0
    broken.phase_start("Building engine", None, 3)
    assert broken.step_complete("Building engine", 0) is True and isinstance(broken.failed, ZeroDivisionError)
    assert "encoder_plan: progress display stopped (ZeroDivisionError: division by zero); the build goes on" in \
        out.getvalue()


def test_phase_says_start_heartbeat_and_elapsed(capsys):
    import time

    with phase("encoder_onnx: exporting", every_s=0.05):
        time.sleep(0.18)
    err = capsys.readouterr().err.splitlines()
    print(err)
    assert err[0] == "encoder_onnx: exporting ..." and err[-1].startswith("encoder_onnx: exporting: done in 0.")
    assert any(line.startswith("encoder_onnx: exporting: still running, 0.") for line in err[1:-1])
    with pytest.raises(ZeroDivisionError), phase("encoder_onnx: failing", every_s=10):
        1 / 0
    assert capsys.readouterr().err == "encoder_onnx: failing ...\n"


def test_streamed_command_lines_go_to_the_log_and_its_status_to_the_terminal(tmp_path, capfd):
    """trtllm-build runs through run_streamed: every line in logs/llm_engine.log as it comes, the
    stage's status line (line count, elapsed, latest line) on the terminal; a failure quotes its tail."""
    log = tmp_path / "logs" / "llm_engine.log"
    script = ("import sys, time\nfor i in range(3): print(f'[TRT-LLM] [I] step {i}', flush=True); time.sleep(0.2)\n"
              "print('warn', file=sys.stderr)")  # slower than the bar's 0.1 s redraw interval
    with stage_output(log):
        run_streamed([sys.executable, "-c", script], "llm_engine: trtllm-build")
    err = capfd.readouterr().err
    assert log.read_text().splitlines() == ["[TRT-LLM] [I] step 0", "[TRT-LLM] [I] step 1", "[TRT-LLM] [I] step 2",
                                            "warn"]
    assert "llm_engine: trtllm-build: " in err and "[TRT-LLM] [I] step" in err
    assert "llm_engine: trtllm-build: done in " in err and "(4 lines of output, in the stage's log)" in err
    failing = "import sys\nfor i in range(50): print(f'line {i}')\nsys.exit(3)"
    tail = r"exited with code 3 .*its last lines:\n  line 10\n(.|\n)*  line 49\n\(what the libraries printed"
    with pytest.raises(RuntimeError, match=tail):
        with stage_output(log):
            run_streamed([sys.executable, "-c", failing], "llm_engine: trtllm-build")
