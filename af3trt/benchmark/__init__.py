"""Benchmarks: latency (per stage, vs transformers, vs hardware floors) and their reports.

`run_latency(LatencyConfig(...)) -> dict`, `write_report(result, "out.json")`, `measure(device)`,
`floors(spec, hw, ...)`, `environment()`, `random_model.build(scale, device=...)`,
`decode_step.decode_step_benchmark(...)` (the fast decoder's step vs its floor). Submodules
import torch; nothing here imports matplotlib, transformers or TensorRT until used.
"""

from .env import environment
from .floor import floor_record, floors, measure
from .latency import LatencyConfig, run_latency
from .report import markdown, write_report

__all__ = ["LatencyConfig", "environment", "floor_record", "floors", "markdown", "measure", "run_latency",
           "write_report"]
