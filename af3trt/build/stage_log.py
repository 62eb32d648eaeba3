"""What third-party libraries print during a build stage goes to that stage's log file.

ModelOpt prints to stdout (`current rank: 0, tp rank: 0 ...`, `Inserted 56 quantizers`, a quant_cfg
dump) and warns (the transformers version it was tested with, "Enable lm_head quantization" while
af3trt's export excludes lm_head); trtllm-build and TensorRT log at length. Inside `stage_output`
file descriptors 1 and 2 (Python prints, C libraries, subprocesses) and third-party warnings are
written to ENGINE_DIR/logs/STAGE.log; af3trt's own warnings (classes defined in af3trt) still reach
the terminal, and so do progress bars made with `progress()`. A failing stage's error names its log.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

_terminal = None  # the terminal's stream while a stage runs (fd 2 then goes to the log)


def progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """`iterable` with a progress bar (its name, count, rate and ETA) on the terminal, also inside a stage."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a base dependency; go on without a bar all the same
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=_terminal or sys.stderr, leave=False)


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
