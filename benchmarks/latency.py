#!/usr/bin/env python
"""AF3 latency: backends x audio lengths x batch sizes -> JSON + markdown + PNG (see benchmarks/README.md).

    python benchmarks/latency.py --model tiny --backends hf,torch --audio-seconds 10,30 --batch 1 --out results.json
    python benchmarks/latency.py --random-weights --backends hf,torch --audio-seconds 30,600 --batch 1,8 --out gpu.json
    python benchmarks/latency.py --floor-only --out floor.json

A thin wrapper: the parser and main live in af3trt.benchmark.cli, shared with `af3trt bench`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from af3trt.benchmark.cli import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
