"""Latency benchmark: backends x audio lengths x batch sizes -> one JSON-ready dict.

Method (STYLE rule 13): every (backend, audio seconds, batch) runs `warmup` untimed calls, then
`repeats` timed calls of one `generate` with `batch` conversations; the output length is fixed
(min_new_tokens = max_new_tokens); the device is synchronized around every timed stage; p50/p90
over the repeats; peak GPU memory is reset before each configuration. Hardware floors (copy
bandwidth, bf16 matmul rate) are measured in the same process, and af3trt/hf ratios come only from
rows of the same run. See benchmarks/README.md for the schema.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..audio import synthetic_audio
from ..errors import OptionError
from ..prompt import PromptBuilder
from ..runtime.pipeline import Pipeline, _dtype
from ..spec import MAX_AUDIO_SECONDS, MAX_WINDOWS, SAMPLE_RATE, WINDOW_SAMPLES, ModelSpec
from ..stats import summary
from ..tiny import default_tiny_dir, make_tiny_checkpoint
from .backends import BACKENDS, LATE_BACKENDS, REFERENCE_BACKEND, Call, conversation
from .env import environment
from .floor import floors, measure, model_summary
from .random_model import build

SCHEMA = "af3trt.latency/1"
STAGES = ("features", "encoder", "prefill", "decode", "ttft", "total")


@dataclass(frozen=True)
class LatencyConfig:
    """What to run. model: "tiny" or an AF3 checkpoint dir (ignored with random_weights)."""

    backends: tuple[str, ...] = ("hf", "torch")
    audio_seconds: tuple[float, ...] = (30.0,)
    batches: tuple[int, ...] = (1,)
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    model: str = "tiny"
    random_weights: bool = False
    scale: float = 1.0
    device: str | None = None
    dtype: str | None = None
    engine_dir: str | None = None
    triton_url: str | None = None  # HTTP host:port
    triton_grpc_url: str | None = None  # gRPC host:port (None: the HTTP host, port + 1)
    triton_model: str = "af3"
    budget_s: float | None = None
    measure_floor: bool = True
    seed: int = 0

    def __post_init__(self):
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise OptionError(f"expected backends from {sorted(BACKENDS)}, got {list(self.backends)}")
        checks = [
            (all(0 < s <= MAX_AUDIO_SECONDS for s in self.audio_seconds) and self.audio_seconds,
             f"audio seconds in (0, {MAX_AUDIO_SECONDS}]", self.audio_seconds),
            (all(isinstance(b, int) and b >= 1 for b in self.batches) and self.batches, "batch sizes >= 1",
             self.batches),
            (self.new_tokens >= 2, "new_tokens >= 2 (decode time needs two tokens)", self.new_tokens),
            (self.repeats >= 1, "repeats >= 1", self.repeats),
            (self.warmup >= 0, "warmup >= 0", self.warmup),
            (0 < self.scale <= 1, "0 < scale <= 1", self.scale),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise OptionError(f"expected {expected}, got {got!r}")


class Models:
    """The model(s) under test, built once and shared by the backends."""

    def __init__(self, cfg: LatencyConfig, device: str, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.engine_dir, self.triton_url, self.triton_model = cfg.engine_dir, cfg.triton_url, cfg.triton_model
        self.triton_grpc_url = cfg.triton_grpc_url
        self._pipeline = self._hf = self._builder = None
        if cfg.random_weights:
            want_hf = any(b.startswith("hf") for b in cfg.backends)
            built = build(cfg.scale, device=device, dtype=dtype, with_hf=want_hf, seed=cfg.seed)
            self.spec, self.path, self.weights = built.spec, None, built.weights
            self.shapes = {"audio_config": built.config["audio_config"], "text_config": built.config["text_config"]}
            self._pipeline = built.pipeline
            self._hf = (built.hf, built.processor) if built.hf is not None else None
        else:
            self.path = make_tiny_checkpoint(default_tiny_dir()) if cfg.model == "tiny" else Path(cfg.model)
            self.spec = ModelSpec.from_dir(self.path)
            self.weights = f"checkpoint {self.path}"
            self.shapes = {"audio": asdict(self.spec.audio), "text": asdict(self.spec.text)}

    def pipeline(self):
        if self._pipeline is None:
            self._pipeline = Pipeline.from_pretrained(self.path, device=self.device, dtype=self.dtype, cache_bytes=0)
        return self._pipeline

    def hf(self):
        if self._hf is None:
            if self.path is None:
                raise RuntimeError("the random-weights transformers model was not built (transformers lacks AF3?)")
            from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

            model = AudioFlamingo3ForConditionalGeneration.from_pretrained(
                self.path, dtype=self.dtype, attn_implementation="sdpa").to(self.device).eval()
            self._hf = (model, AutoProcessor.from_pretrained(str(self.path)))
        return self._hf

    def prompt_stats(self, convs) -> tuple[int, int]:
        """(longest prompt of the batch in tokens, audio tokens of the first request), af3trt's count."""
        if self._builder is None:
            if self._pipeline is not None or self.path is None:
                self._builder = self.pipeline().builder
            else:
                self._builder = PromptBuilder.from_pretrained(self.path, self.spec.audio_token_id,
                                                              self.spec.text.vocab_size)
        prompts = [self._builder.build(c) for c in convs]
        return max(len(p.input_ids) for p in prompts), prompts[0].num_audio_tokens


def _resolve(cfg: LatencyConfig) -> tuple[str, torch.dtype]:
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, _dtype(cfg.dtype, device)


def _percentiles(values: list[float | None], scale: float = 1.0) -> dict | None:
    if not values or any(v is None for v in values):
        return None
    return summary(values, scale, keys=("p50", "p90", "min", "max"))


def windows_for(seconds: float) -> int:
    """30 s encoder windows of one clip of `seconds` (at most MAX_WINDOWS)."""
    return min(MAX_WINDOWS, math.ceil(round(seconds * SAMPLE_RATE) / WINDOW_SAMPLES))


def summarize(calls: list[Call], *, seconds: float, batch: int, new_tokens: int) -> dict:
    """Per-stage p50/p90 (ms), time per output token, RTF and throughput of a row's timed calls."""
    stages = {s: _percentiles([getattr(c, s) for c in calls], 1e3) for s in STAGES}
    stages["e2e"] = stages.pop("total")
    tpot = _percentiles([c.decode / (new_tokens - 1) if c.decode is not None else None for c in calls], 1e3)
    audio = batch * seconds
    e2e = stages["e2e"]["p50"] / 1e3
    decode = stages["decode"]["p50"] / 1e3 if stages["decode"] else None
    return {
        "stages_ms": stages,
        "tpot_ms": tpot,
        "rtf": _percentiles([c.total / audio for c in calls]),
        "throughput": {
            "tokens_per_s": batch * new_tokens / e2e,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode if decode else None,
            "audio_hours_per_hour": audio / e2e,
            "requests_per_s": batch / e2e,
        },
    }


def _floor_block(spec: ModelSpec, hw: dict | None, row: dict, precision: str) -> dict | None:
    if not hw:
        return None
    kv = row.get("kv_precision", "auto")
    kv = precision if kv == "auto" and precision in ("bf16", "fp16", "fp32") else ("bf16" if kv == "auto" else kv)
    try:
        f = floors(spec, hw, batch=row["batch"], prompt_tokens=row["prompt_tokens"], new_tokens=row["new_tokens"],
                   windows=row["batch"] * windows_for(row["audio_seconds"]), precision=precision, kv_precision=kv)
    except ValueError as exc:  # no floor rather than another precision's
        return {"note": f"no floor: {exc}"}

    def pct(floor_ms, stage):
        got = stage["p50"] if stage else None
        return 100.0 * floor_ms / got if floor_ms and got else None

    stages = row["stages_ms"]
    f["pct_of_floor"] = {"decode": pct(f["decode_ms_per_token"], row["tpot_ms"]),
                         "prefill": pct(f["prefill_ms"], stages["prefill"]),
                         "encoder": pct(f["encoder_ms"], stages["encoder"])}
    return f


def _memory_reset(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


STILL_WARMING = 1.5  # first timed call / median of the later ones past which a row says warm-up fell short


def measure_row(backend, convs, row: dict, cfg: LatencyConfig, device: str) -> dict:
    """Warm up on this very shape (`cfg.warmup` untimed calls of the same backend, audio length and
    batch: per-shape allocations, kernel choices and compiles happen there), then time `repeats`
    calls; fills `row` in place (`warmup_s`: each warm-up call's seconds)."""
    _memory_reset(device)
    warm = []
    for _ in range(cfg.warmup):
        t0 = time.perf_counter()
        backend.run(convs, cfg.new_tokens)
        warm.append(time.perf_counter() - t0)
    calls = [backend.run(convs, cfg.new_tokens) for _ in range(cfg.repeats)]
    row.update(summarize(calls, seconds=row["audio_seconds"], batch=row["batch"], new_tokens=cfg.new_tokens))
    if not all(c.new_tokens == cfg.new_tokens for c in calls):
        row["tpot_ms"], row["throughput"]["decode_tokens_per_s"] = None, None
        row["notes"].append("output length not enforced by this backend: per-token figures omitted")
    later = sorted(c.total for c in calls[1:])
    if later and calls[0].total > STILL_WARMING * later[len(later) // 2]:
        row["notes"].append(f"timed calls were still getting faster (first {calls[0].total * 1e3:.1f} ms, median of "
                            f"the rest {later[len(later) // 2] * 1e3:.1f} ms): warm-up fell short, raise --warmup "
                            f"(now {cfg.warmup})")
    row.update(status="ok", warmup_s=warm, peak_memory_gb=_peak_gb(device), precision=backend.precision,
               kv_precision=getattr(backend, "kv_precision", "auto"))
    return row


def add_ratios(rows: list[dict]) -> None:
    """vs_hf: hf p50 / row p50 (> 1 = faster than transformers) for rows of the same length and batch."""
    ref = {(r["audio_seconds"], r["batch"]): r for r in rows
           if r["backend"] == REFERENCE_BACKEND and r["status"] == "ok"}
    for r in rows:
        h = ref.get((r["audio_seconds"], r["batch"]))
        if r["status"] != "ok" or h is None or r is h:
            continue
        ratio = {}
        for key, a, b in [("e2e", h["stages_ms"]["e2e"], r["stages_ms"]["e2e"]),
                          ("ttft", h["stages_ms"]["ttft"], r["stages_ms"]["ttft"]),
                          ("prefill", h["stages_ms"]["prefill"], r["stages_ms"]["prefill"]),
                          ("encoder", h["stages_ms"]["encoder"], r["stages_ms"]["encoder"]),
                          ("tpot", h["tpot_ms"], r["tpot_ms"])]:
            ratio[f"{key}_speedup"] = a["p50"] / b["p50"] if a and b and b["p50"] > 0 else None
        r["vs_hf"] = ratio


def _plan(cfg: LatencyConfig) -> list[tuple[str, float, int, bool]]:
    """(backend, seconds, batch, last row of that backend) in run order: the usual backends
    configuration-major (their ratios exist even if the budget runs out), then each of
    LATE_BACKENDS over all configurations in turn."""
    configs = [(s, b) for s in cfg.audio_seconds for b in cfg.batches]
    early = [b for b in cfg.backends if b not in LATE_BACKENDS]
    order = [(name, s, b) for s, b in configs for name in early]
    order += [(name, s, b) for name in cfg.backends if name in LATE_BACKENDS for s, b in configs]
    last = {name: i for i, (name, _, _) in enumerate(order)}
    return [(name, s, b, last[name] == i) for i, (name, s, b) in enumerate(order)]


class _Inputs:
    """Conversations of a (seconds, batch): different synthetic clips per request, shared across batch
    sizes of the same length (only one length is kept in memory); prompt sizes counted once."""

    def __init__(self, models: Models, seed: int):
        self.models, self.seed = models, seed
        self.clips: dict[tuple, np.ndarray] = {}
        self.stats: dict[tuple, tuple[int, int]] = {}

    def get(self, seconds: float, batch: int):
        if any(s != seconds for s, _ in self.clips):
            self.clips.clear()
        for i in range(batch):
            if (seconds, i) not in self.clips:
                self.clips[(seconds, i)] = synthetic_audio(seconds, self.seed + i)
        convs = [conversation(self.clips[(seconds, i)]) for i in range(batch)]
        if (seconds, batch) not in self.stats:
            self.stats[(seconds, batch)] = self.models.prompt_stats(convs)
        return convs, self.stats[(seconds, batch)]


@dataclass
class _State:
    backends: dict
    status: dict = field(default_factory=dict)  # name -> None (ready) or reason string


def _ready(state: _State, name: str, result: dict) -> str | None:
    """Set a backend up on first use; returns None when usable, else the skip/error text."""
    if name not in state.status:
        backend = state.backends[name]
        reason = backend.unavailable()
        if reason is None:
            try:
                backend.setup()
            except Exception as exc:  # recorded per backend; the other backends still run
                reason = f"error: setup failed: {type(exc).__name__}: {exc}"
        else:
            reason = f"skipped: {reason}"
        state.status[name] = reason
        result["backends"][name] = {"status": reason or "ok", "description": backend.description,
                                    "precision": backend.precision}
    return state.status[name]


def run_latency(cfg: LatencyConfig, on_update=None) -> dict:
    """Run the benchmark; returns the result dict (schema in benchmarks/README.md).

    on_update(result) is called after every row, so a caller can persist partial results.
    """
    start = time.perf_counter()
    device, dtype = _resolve(cfg)
    notify = on_update or (lambda _r: None)
    result = {"schema": SCHEMA, "env": environment(), "config": {**asdict(cfg), "device": device, "dtype": str(dtype)},
              "hardware": None, "model": None, "backends": {}, "results": [],
              "notes": ["af3trt's encoder-output cache is off: every call runs features and encoder"]}
    if cfg.measure_floor:
        result["hardware"] = measure(device)
        notify(result)
    models = Models(cfg, device, dtype)
    result["model"] = {"source": "random" if cfg.random_weights else str(models.path), "scale": cfg.scale,
                       "weights": models.weights, "shapes": models.shapes,
                       "summary": model_summary(models.spec, result["hardware"])}
    state = _State({name: BACKENDS[name](models) for name in cfg.backends})
    inputs = _Inputs(models, cfg.seed)
    for name, seconds, batch, last in _plan(cfg):
        row = {"backend": name, "precision": state.backends[name].precision, "audio_seconds": seconds,
               "batch": batch, "new_tokens": cfg.new_tokens, "prompt_tokens": None, "audio_tokens_per_request": None,
               "repeats": cfg.repeats, "warmup": cfg.warmup, "status": None, "notes": []}
        reason = _ready(state, name, result)
        if reason is None and cfg.budget_s is not None and time.perf_counter() - start > cfg.budget_s:
            reason = f"skipped: time budget of {cfg.budget_s:.0f} s spent"
        if reason is None:
            try:
                convs, (row["prompt_tokens"], row["audio_tokens_per_request"]) = inputs.get(seconds, batch)
                measure_row(state.backends[name], convs, row, cfg, device)
                row["floor"] = _floor_block(models.spec, result["hardware"], row, row["precision"])
            except Exception as exc:  # e.g. out of memory at 10 min x 8: recorded, the next row runs
                row["status"] = f"error: {type(exc).__name__}: {str(exc)[:400]}"
                _memory_reset(device)
        else:
            row["status"] = reason
        if last and state.status.get(name) is None:
            state.backends[name].close()
            _memory_reset(device)
        result["results"].append(row)
        notify(result)
    add_ratios(result["results"])
    result["elapsed_s"] = time.perf_counter() - start
    notify(result)
    return result
