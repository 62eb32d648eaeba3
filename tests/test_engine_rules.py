"""KV-cache options against what trtllm-build (TensorRT-LLM 1.2 builder.py) keeps, drops or refuses
(issue 12, finding 3): reuse is never enabled on an engine without paged context FMHA."""

import json
import logging

import pytest

from af3trt.build.engine_dir import BuildOptions, build_engine_dir
from af3trt.build.engine_rules import UnsupportedTarget, effective_plugins, target_gpu
from af3trt.formats.trtllm_engine import kv_reuse_allowed
from af3trt.formats.manifest import Manifest

from .test_triton import fake_engine_dir, parse_repository

HOPPER, AMPERE, BLACKWELL, RTX_BLACKWELL = 90, 86, 100, 120

# (precision, kv_cache, sm) -> (paged context FMHA, FP8 context FMHA), as builder.py's build() leaves them
KEPT = {
    ("bf16", "auto", HOPPER): (True, False), ("fp16", "auto", AMPERE): (True, False),
    ("int8_wo", "auto", HOPPER): (True, False), ("int8_sq", "auto", HOPPER): (True, False),
    ("int4_awq", "auto", HOPPER): (True, False),
    ("fp8", "fp8", HOPPER): (True, True), ("fp8", "auto", HOPPER): (True, False),  # fp8 ctx FMHA needs fp8 KV
    ("fp8", "auto", AMPERE): (True, False), ("fp8", "fp8", BLACKWELL): (True, True),
    ("int8_wo", "auto", RTX_BLACKWELL): (True, False),  # the SM>=100 refusals stop at 119
}
DROPPED = {  # paged context FMHA switched off (with only a warning in trtllm-build)
    ("bf16", "int8", HOPPER): "an INT8 KV cache", ("fp8", "int8", HOPPER): "an INT8 KV cache",
    ("bf16", "fp8", HOPPER): "an FP8 KV cache with non-FP8 weights", ("int4_awq", "fp8", HOPPER): "non-FP8 weights",
    ("int8_sq", "fp8", HOPPER): "non-FP8 weights", ("int8_wo", "fp8", HOPPER): "non-FP8 weights",
    ("fp8", "fp8", AMPERE): "FP8 context FMHA needs SM89+",
}
REFUSED = {
    ("int8_wo", "auto", BLACKWELL): "INT8/INT4 quantization is not supported on SM>=100",
    ("int4_awq", "auto", BLACKWELL): "INT8/INT4", ("bf16", "int8", BLACKWELL): "INT8/INT4",
    ("int8_sq", "auto", BLACKWELL): "SmoothQuant is not supported on SM>=100",
}


@pytest.mark.parametrize("case", list(KEPT))
def test_kept(case):
    got = effective_plugins(*case)
    assert (got.use_paged_context_fmha, got.use_fp8_context_fmha) == KEPT[case] and got.changes == ()
    assert got.kv_cache_reuse


@pytest.mark.parametrize("case", list(DROPPED))
def test_dropped_paged_context_fmha_is_named(case):
    got = effective_plugins(*case)
    print(got.changes)
    assert not got.use_paged_context_fmha and not got.kv_cache_reuse
    p, kv, sm = case
    assert len(got.changes) == 1 and f"--precision {p} --kv-cache {kv} on SM{sm}" in got.changes[0]
    assert DROPPED[case] in got.changes[0]


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_on_sm100(case):
    with pytest.raises(UnsupportedTarget, match=REFUSED[case]):
        effective_plugins(*case)


def test_refused_at_build_before_calibration(tiny_dir, tmp_path, monkeypatch):
    import af3trt.build.calibration as calibration

    monkeypatch.setattr(calibration, "llm_calibration_batches", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(UnsupportedTarget, match=r"--precision int8_sq --kv-cache auto on SM100: .*SmoothQuant"):
        build_engine_dir(model=tiny_dir, out=tmp_path / "e",
                         options=BuildOptions(precision="int8_sq", stages=("llm",), target_sm=100))
    assert not (tmp_path / "e" / "manifest.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present: the target is that GPU")
def test_no_gpu_assumes_sm90_and_the_manifest_says_so():
    t = target_gpu()
    assert t.sm == 90 and t.source.startswith("assumed: no GPU at build")
    assert target_gpu(89).record() == {"sm": 89, "source": "assumed: no GPU at build, --target-sm"}
    with pytest.raises(ValueError, match=r"expected --target-sm as major\*10\+minor .*got 9"):
        target_gpu(9)


def test_build_warns_and_records_the_lost_reuse(tiny_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="af3trt.build.engine_rules")
    out = tmp_path / "e"
    build_engine_dir(model=tiny_dir, out=out, options=BuildOptions(
        precision="bf16", kv_cache="int8", stages=("llm",), calib_size=2, calib_max_tokens=128))
    print(caplog.text)
    assert "--precision bf16 --kv-cache int8 on SM90: an INT8 KV cache turns paged context FMHA off" in caplog.text
    m = Manifest.read(out).precision
    assert m["target_gpu"]["sm"] == 90 and m["engine_plugins"]["kv_cache_reuse"] is False


def _engine_config(root, paged):
    path = root / "llm" / "engine" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["build_config"]["plugin_config"] = {"use_paged_context_fmha": paged, "context_fmha": True}
    path.write_text(json.dumps(cfg))
    return cfg


def test_reuse_only_where_the_engine_has_paged_context_fmha(tiny_dir, tmp_path):
    from af3trt.build.triton import write_repository

    root = fake_engine_dir(tiny_dir, tmp_path / "engine")
    for paged in (True, False):
        cfg = _engine_config(root, paged)
        assert kv_reuse_allowed(cfg) is paged
        repo = write_repository(root, tmp_path / f"repo-{paged}", llm_backend="tensorrtllm")
        params = {k: v.string_value for k, v in parse_repository(repo.path)["tensorrt_llm"].parameters.items()}
        assert params["enable_kv_cache_reuse"] == str(paged).lower()
    with pytest.raises(ValueError, match="expected kv_cache_reuse off or unset .* use_paged_context_fmha false"):
        write_repository(root, tmp_path / "repo-forced", llm_backend="tensorrtllm", kv_cache_reuse=True)
    assert not kv_reuse_allowed({"build_config": {"kv_cache_type": "CONTINUOUS",
                                                  "plugin_config": {"use_paged_context_fmha": True}}})
