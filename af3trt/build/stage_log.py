"""What third-party libraries print during a build stage goes to that stage's log file.

ModelOpt prints to stdout (`current rank: 0, tp rank: 0 ...`, `Inserted 56 quantizers`, a quant_cfg
dump) and warns (the transformers version it was tested with, "Enable lm_head quantization" while
af3trt's export excludes lm_head); trtllm-build and TensorRT log at length. Inside `stage_output`
file descriptors 1 and 2 (Python prints, C libraries, subprocesses) and third-party warnings are
written to ENGINE_DIR/logs/STAGE.log; af3trt's own warnings (classes defined in af3trt) still reach
the terminal, and so do af3trt's progress lines: bars made with `progress()`, `say()` lines,
`phase()` around one long call that reports nothing itself (start, a heartbeat, elapsed time), and
`run_streamed()` for a subprocess (every line to the log, its latest line on the terminal). A failing
stage's error names its log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path

_terminal = None  # the terminal's stream while a stage runs (fd 2 then goes to the log)


HEARTBEAT_S = 30.0  # seconds between `phase()`'s "still running" lines


def terminal():
    """The terminal's stream: stderr outside a stage, the saved one inside (fd 2 then goes to the log)."""
    return _terminal or sys.stderr


def progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """`iterable` with a progress bar (its name, count, rate and ETA) on the terminal, also inside a stage."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a base dependency; go on without a bar all the same
        return iterable
    # position 0: `af3trt build`'s own bar is cleared while a stage runs, so this one draws on its line
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=terminal(), leave=False, position=0)


def say(line: str) -> None:
    """One af3trt line on the terminal (inside a stage too)."""
    print(line, file=terminal(), flush=True)


def clock(seconds: float) -> str:
    """12.3 s | 4 min 05 s | 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@contextlib.contextmanager
def phase(desc: str, every_s: float = HEARTBEAT_S):
    """Progress lines around one long call that reports none itself (torch.onnx.export, onnx's
    checker): `DESC ...` at its start, `DESC: still running, T elapsed` every `every_s` seconds,
    `DESC: done in T` at its end (nothing more when it raises: the error says what happened).
    Elapsed time only: such a call gives nothing to estimate its remaining time from."""
    out = terminal()
    print(f"{desc} ...", file=out, flush=True)
    t0 = time.perf_counter()
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(every_s):
            print(f"{desc}: still running, {clock(time.perf_counter() - t0)} elapsed", file=out, flush=True)

    beat = threading.Thread(target=heartbeat, name="af3trt-phase", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
    print(f"{desc}: done in {clock(time.perf_counter() - t0)}", file=out, flush=True)


def run_streamed(argv: list[str], desc: str, keep: int = 40) -> None:
    """Run `argv`, every line of its stdout + stderr copied to our fd 1 (the stage's log inside
    `stage_output`) as it comes, and a status line on the terminal: `desc`, the lines so far, the
    elapsed time and the latest line (the command gives no total, so no ETA). A non-zero exit
    raises RuntimeError with its last `keep` lines."""
    tail: deque[str] = deque(maxlen=keep)
    t0 = time.perf_counter()
    bar = _status_bar(desc)
    sys.stdout.flush()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          bufsize=1) as proc:
        lines = 0
        for line in proc.stdout:
            os.write(1, line.encode())
            lines += 1
            text = line.rstrip()
            tail.append(text)
            if bar is not None and text:
                bar.set_postfix_str(text[-100:], refresh=False)
                bar.update()
        code = proc.wait()
    if bar is not None:
        bar.close()
    if code != 0:
        shown = "\n".join(f"  {t}" for t in tail) or "  (it printed nothing)"
        raise RuntimeError(f"{desc}: {argv[0]} exited with code {code} after {clock(time.perf_counter() - t0)}; "
                           f"its last lines:\n{shown}")
    say(f"{desc}: done in {clock(time.perf_counter() - t0)} ({lines} lines of output, in the stage's log)")


def _status_bar(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a base dependency; the lines still reach the log
        return None
    return tqdm(desc=desc, unit="line", file=terminal(), leave=False, position=0)


@contextlib.contextmanager
def stage_output(log_path: Path):
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    global _terminal
    terminal = _terminal = os.fdopen(os.dup(saved_err), "w", buffering=1)
    with open(log_path, "a", buffering=1) as log, warnings.catch_warnings():
        warnings.simplefilter("default")

        def show(message, category, filename, lineno, file=None, line=None):
            ours = category.__module__.split(".")[0] == "af3trt"
            (terminal if ours else log).write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield log_path
        except Exception as exc:
            exc.add_note(f"(what the libraries printed during this stage: {log_path})")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            _terminal = None
            terminal.close()
