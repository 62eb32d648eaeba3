"""Cancelling the `af3` model's downstream LLM request where the python backend cannot.

The `af3` BLS model notices a cancelled client request with `request.is_cancelled()` and cancels the
decoupled LLM request it started with the BLS response iterator's `cancel()`. That method exists
from python backend r25.04 on (triton-inference-server/python_backend PR #398); the backend inside
the nvidia-pytriton 0.7.0 wheel (the CPU server of the tests) predates it, and there a cancelled
parent leaves its BLS child running. For af3trt's own python LLM model a marker file stands in:
`af3` names its LLM request (`request_id`), and on cancellation it touches `marker(request_id)`,
which the LLM checks after every token. The TensorRT-LLM C++ backend is stopped by `cancel()` only.

Light on purpose: imported inside the Triton server by both python models.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

DIR = Path(tempfile.gettempdir()) / "af3trt-cancelled"


def new_request_id() -> str:
    return f"af3trt-{uuid.uuid4().hex}"


def marker(request_id: str) -> Path:
    return DIR / request_id


def mark_cancelled(request_id: str) -> None:
    """Tell af3trt's python LLM that `request_id` was cancelled (it stops after its current token)."""
    DIR.mkdir(parents=True, exist_ok=True)
    marker(request_id).touch()


def is_marked(request_id: str) -> bool:
    return bool(request_id) and request_id.startswith("af3trt-") and os.path.exists(marker(request_id))


def clear(request_id: str) -> None:
    try:
        os.unlink(marker(request_id))
    except FileNotFoundError:
        pass
