"""Latency report: JSON (finite numbers only), a markdown table and PNG plots beside it.

matplotlib is imported lazily with the Agg backend; without it the plots are skipped and the
result's notes say so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .. import fileio


def finite(obj):
    """Copy of obj with NaN/inf floats replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return finite(obj.item())
    return obj


def write_json(result: dict, path: str | Path) -> Path:
    """Atomic write (temp file + rename): a killed run leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite(result), indent=2, allow_nan=False, default=str)
    fd, tmp = fileio.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)
    return path


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _p50(stage) -> float | None:
    return stage["p50"] if stage else None


def _header(result: dict) -> list[str]:
    env, hw, model = result.get("env") or {}, result.get("hardware"), result.get("model") or {}
    gpu = env.get("gpu") or {}
    versions = env.get("versions") or {}
    lines = ["# AF3 latency", "",
             f"- device: {gpu.get('name') or 'cpu'} (driver {gpu.get('driver')}, CUDA {env.get('cuda')}); "
             f"host {(env.get('host') or {}).get('cpu')}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
             f"- commit: {(env.get('git') or {}).get('commit')}; model: {model.get('source')} "
             f"(scale {model.get('scale')}); weights: {model.get('weights')}"]
    if hw:
        lines.append(f"- measured on {hw['device_name']}: copy {hw['copy_gbps']:.0f} GB/s, "
                     f"bf16 matmul {hw['matmul_bf16_tflops']:.3g} TFLOP/s")
    cfg = result.get("config") or {}
    lines.append(f"- {cfg.get('new_tokens')} new tokens (fixed), {cfg.get('warmup')} warm-up + {cfg.get('repeats')} "
                 f"timed calls per row, p50 (p90) in ms; RTF = end-to-end / audio seconds of the batch")
    return lines


TABLE_COLUMNS = ("backend", "prec", "audio s", "batch", "prompt tok", "features", "encoder", "prefill", "TTFT",
                 "ms/token", "e2e", "RTF", "tok/s", "audio h/h", "peak GB", "% decode floor", "× hf e2e",
                 "× hf ms/token")


def _row_cells(r: dict) -> list[str]:
    s = r["stages_ms"]
    tp = r.get("tpot_ms")
    floor = (r.get("floor") or {}).get("pct_of_floor") or {}
    vs = r.get("vs_hf") or {}

    def both(stage):
        return f"{_fmt(stage['p50'])} ({_fmt(stage['p90'])})" if stage else "–"

    return [r["backend"], r["precision"], _fmt(r["audio_seconds"], 0), str(r["batch"]), str(r["prompt_tokens"]),
            _fmt(_p50(s["features"])), _fmt(_p50(s["encoder"])), _fmt(_p50(s["prefill"])), both(s["ttft"]),
            both(tp), both(s["e2e"]), _fmt(_p50(r["rtf"]), 4), _fmt(r["throughput"]["tokens_per_s"]),
            _fmt(r["throughput"]["audio_hours_per_hour"]), _fmt(r.get("peak_memory_gb"), 2),
            _fmt(floor.get("decode")), _fmt(vs.get("e2e_speedup"), 2), _fmt(vs.get("tpot_speedup"), 2)]


def markdown(result: dict) -> str:
    """The result as a markdown page: environment header, one table row per measured configuration."""
    lines = _header(result) + ["", "| " + " | ".join(TABLE_COLUMNS) + " |",
                               "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    other = []
    for r in result.get("results", []):
        if r["status"] == "ok":
            lines.append("| " + " | ".join(_row_cells(r)) + " |")
        else:
            other.append(f"- {r['backend']} {_fmt(r['audio_seconds'], 0)} s × {r['batch']}: {r['status']}")
    floors = [(r["backend"], r["audio_seconds"], r["batch"], r["floor"]) for r in result.get("results", [])
              if r["status"] == "ok" and r.get("floor")]
    if floors:
        lines += ["", "Floors (ms): decode per token = (weights + KV read) / copy bandwidth; prefill and encoder = "
                      "FLOPs / bf16 matmul rate", ""]
        lines += [f"- {b} {_fmt(s, 0)} s × {n}: decode {_fmt(f['decode_ms_per_token'], 2)} "
                  f"(weights only {_fmt(f['decode_ms_per_token_weights_only'], 2)}), prefill {_fmt(f['prefill_ms'], 1)}, "
                  f"encoder {_fmt(f['encoder_ms'], 1)}" for b, s, n, f in floors]
    if other:
        lines += ["", "Not measured:", ""] + other
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(result: dict, path: Path) -> Path:
    """End-to-end p50 latency vs audio length, one line per (backend, batch)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in result["results"]:
        if r["status"] == "ok":
            point = (r["audio_seconds"], r["stages_ms"]["e2e"]["p50"])
            series.setdefault((r["backend"], r["batch"]), []).append(point)
    for (backend, batch), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{backend}, batch {batch}")
    lengths = [p[0] for points in series.values() for p in points]
    if lengths and max(lengths) > 10 * min(lengths):
        ax.set_xscale("log")
    ax.set_xlabel("audio length per request (s)")
    ax.set_ylabel("end-to-end latency p50 (ms)")
    ax.set_title(f"AF3 latency ({_device_label(result)})")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decode(result: dict, path: Path) -> Path:
    """Decode ms/token p50 per configuration, with the bandwidth floor of each as a marker."""
    plt = _pyplot()
    rows = [r for r in result["results"] if r["status"] == "ok" and r.get("tpot_ms")]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    xs = list(range(len(rows)))
    ax.bar(xs, [r["tpot_ms"]["p50"] for r in rows], color="tab:blue", label="measured p50")
    floor = [(x, (r.get("floor") or {}).get("decode_ms_per_token")) for x, r in zip(xs, rows)]
    floor = [(x, f) for x, f in floor if f]
    if floor:
        ax.scatter([x for x, _ in floor], [f for _, f in floor], color="tab:red", marker="_", s=600, linewidths=3,
                   label="bandwidth floor", zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r['backend']}\n{r['audio_seconds']:g}s×{r['batch']}" for r in rows], fontsize=7)
    ax.set_ylabel("decode time per output token (ms)")
    ax.set_title(f"AF3 decode vs floor ({_device_label(result)})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _device_label(result: dict) -> str:
    hw = result.get("hardware") or {}
    return hw.get("device_name") or (result.get("config") or {}).get("device", "?")


def write_report(result: dict, json_path: str | Path) -> dict[str, str]:
    """Write JSON, markdown (.md) and PNGs (_latency.png, _decode.png) beside json_path; returns the paths."""
    json_path = Path(json_path)
    stem = json_path.with_suffix("")
    written = {}
    try:
        written["latency_png"] = str(plot_latency(result, Path(f"{stem}_latency.png")))
        written["decode_png"] = str(plot_decode(result, Path(f"{stem}_decode.png")))
    except ImportError as exc:
        note = f"plots skipped: {exc} (pip install 'af3trt[bench]')"
        if note not in result["notes"]:
            result["notes"].append(note)
    md = Path(f"{stem}.md")
    md.write_text(markdown(result))
    written["markdown"] = str(md)
    written["json"] = str(write_json(result, json_path))
    return written
