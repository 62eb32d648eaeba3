"""One precision table for build, floors, labels and CLI choices; one percentile definition
(issue 12, finding 10)."""

import importlib.util
import statistics
from pathlib import Path

import pytest

from af3trt.benchmark.floor import WEIGHT_BYTES, decode_weight_bytes
from af3trt.formats.precision import KV_CACHES, PRECISIONS
from af3trt.stats import percentile

SAMPLES = [10.0, 11.0, 30.0]  # ms: three timed calls, one slow


def test_every_build_precision_has_its_own_floor():
    from af3trt.tiny import full_spec

    t = full_spec().text
    gb = {p: decode_weight_bytes(t, p) / 1e9 for p in PRECISIONS}
    print({p: round(v, 2) for p, v in gb.items()})
    assert set(PRECISIONS) <= set(WEIGHT_BYTES)
    assert gb["int8_wo"] == gb["int8_sq"] == gb["fp8"] < gb["bf16"] == gb["fp16"]
    assert gb["int4_awq"] < gb["int8_wo"]


def test_rows_are_floored_at_their_own_precision():
    from af3trt.benchmark.latency import _floor_block
    from af3trt.tiny import full_spec

    hw = {"copy_gbps": 4000.0, "matmul_bf16_tflops": 700.0}
    row = {"batch": 1, "prompt_tokens": 800, "new_tokens": 32, "audio_seconds": 30.0, "stages_ms": {
        "decode": None, "prefill": None, "encoder": None}, "tpot_ms": None}
    blocks = {p: _floor_block(full_spec(), hw, dict(row), p) for p in ("bf16", "int8_wo", "int4_awq")}
    for p, b in blocks.items():
        print(p, b.get("decode_ms_per_token"), b.get("note"))
        assert "note" not in b and b["precision"] == p
    assert blocks["int4_awq"]["decode_ms_per_token"] < blocks["int8_wo"]["decode_ms_per_token"] < \
        blocks["bf16"]["decode_ms_per_token"]
    unknown = _floor_block(full_spec(), hw, dict(row), "engine")
    assert set(unknown) == {"note"} and "expected weight precision in" in unknown["note"]  # never bf16's


def test_engine_dir_rows_are_labelled_with_the_registry_names(engine_dir, tmp_path):
    import json
    import shutil

    from af3trt.benchmark.backends import engine_labels
    from af3trt.formats.manifest import Manifest

    assert engine_labels(Manifest.read(engine_dir)) == ("bf16", "auto")
    other = tmp_path / "e"
    shutil.copytree(engine_dir, other)
    data = json.loads((other / "manifest.json").read_text())
    data["precision"].update(llm="int8_wo", kv_cache="int8")
    (other / "manifest.json").write_text(json.dumps(data))
    assert engine_labels(Manifest.read(other)) == ("int8_wo", "int8")


def test_cli_choices_are_the_registry(capsys):
    from af3trt.cli import build_parser, main

    build = build_parser()._subparsers._group_actions[0].choices["build"]
    actions = {a.dest: a for a in build._actions}
    assert list(actions["precision"].choices) == list(PRECISIONS)
    assert list(actions["kv_cache"].choices) == list(KV_CACHES)
    with pytest.raises(SystemExit):
        main(["build", "--model", "tiny", "--out", "x", "--precision", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def _kernels_bench():
    path = Path(__file__).parents[1] / "benchmarks" / "kernels_bench.py"
    spec = importlib.util.spec_from_file_location("kernels_bench_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_percentile_definition_never_beyond_the_samples():
    from af3trt.benchmark.latency import _percentiles as latency_p
    from af3trt.benchmark.decode_step import _percentiles as decoder_p

    old_p90 = statistics.quantiles(SAMPLES, n=10)[8]
    print(f"statistics.quantiles p90 {old_p90:.1f} ms > slowest {max(SAMPLES)} ms; "
          f"af3trt p90 {percentile(SAMPLES, 90):.1f} ms")
    assert old_p90 > max(SAMPLES)  # what the decoder benchmark used to report
    p50, p90 = percentile(SAMPLES, 50), percentile(SAMPLES, 90)
    assert p50 == 11.0 and p90 == pytest.approx(26.2) and min(SAMPLES) <= p90 <= max(SAMPLES)
    assert (latency_p(SAMPLES)["p50"], latency_p(SAMPLES)["p90"]) == (p50, p90)
    assert (decoder_p(SAMPLES)["p50"], decoder_p(SAMPLES)["p90"]) == (p50, p90)
    kb = _kernels_bench()
    assert (kb.percentile(SAMPLES, 50), kb.percentile(SAMPLES, 90)) == (p50, p90)
    assert percentile([5.0], 90) == 5.0
    with pytest.raises(ValueError, match="at least one value"):
        percentile([], 50)
