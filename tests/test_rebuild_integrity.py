"""`af3trt build` trusts a stage only when its inputs (full content hashes) and its recorded outputs
(per-file sizes and hashes) are unchanged (issue 12, finding 5)."""

import json
import shutil
import struct

import numpy as np
import pytest

from af3trt.build.engine_dir import BuildOptions, _stage_flags, build_engine_dir
from af3trt.formats.manifest import Manifest, ManifestError
from af3trt.checkpoint import Checkpoint
from af3trt.runtime import Pipeline
from af3trt.audio import synthetic_audio

from .test_prompt import audio_turn

LLM_ONLY = BuildOptions(precision="bf16", stages=("llm",))


def middle_tensor(path):
    """(name, start, end) byte range of an LM tensor lying wholly between the first and the last MiB."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    size, mib = len(raw), 1 << 20
    for name, info in header.items():
        if name.startswith("language_model.") and isinstance(info, dict):
            start, end = (8 + n + o for o in info["data_offsets"])
            if start > mib and end < size - mib and end - start >= 4096:
                return name, start, end
    raise AssertionError(f"no LM tensor in the middle of {path} ({size} bytes)")


@pytest.fixture
def own_tiny(tiny_dir, tmp_path):
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_a_weight_changed_in_place_changes_the_fingerprint_and_rebuilds(own_tiny, tmp_path):
    out = tmp_path / "e"
    build_engine_dir(model=own_tiny, out=out, options=LLM_ONLY)
    before = Manifest.read(out).stages["llm_checkpoint"]
    weights = own_tiny / "model.safetensors"
    name, start, end = middle_tensor(weights)
    fp = Checkpoint.open(own_tiny).fingerprint()
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:  # same size, same header: only this tensor's values change
        fh.seek(start)
        values = np.frombuffer(fh.read(end - start), np.float32)
        fh.seek(start)
        fh.write((values * -2.0).astype(np.float32).tobytes())
    assert weights.stat().st_size == size
    print(f"changed {name} bytes [{start}, {end}) of {size}")
    assert Checkpoint.open(own_tiny).fingerprint() != fp
    build_engine_dir(model=own_tiny, out=out, options=LLM_ONLY)
    after = Manifest.read(out).stages["llm_checkpoint"]
    assert after["checkpoint"] != before["checkpoint"] and after["outputs"] != before["outputs"]


def test_a_changed_tokenizer_file_enters_the_key(own_tiny):
    fp = Checkpoint.open(own_tiny).fingerprint()
    (own_tiny / "chat_template.jinja").write_text((own_tiny / "chat_template.jinja").read_text() + " ")
    assert Checkpoint.open(own_tiny).fingerprint() != fp


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_checkpoint_file_is_refused_at_run_and_rebuilt_by_the_next_build(tiny_dir, tmp_path, damage):
    out = tmp_path / "e"
    build_engine_dir(model=tiny_dir, out=out, options=LLM_ONLY)
    rank0 = out / "llm" / "checkpoint" / "rank0.safetensors"
    good = rank0.read_bytes()
    entry = Manifest.read(out).stages["llm_checkpoint"]
    assert entry["outputs"]["llm/checkpoint/rank0.safetensors"]["size"] == len(good)
    if damage == "deleted":
        rank0.unlink()
    else:
        rank0.write_bytes(good[: len(good) // 2])
    with pytest.raises(ManifestError, match=r"stage 'llm_checkpoint' .* is not what was built: "
                                            r"llm/checkpoint/rank0.safetensors: (missing|\d+ bytes, recorded \d+)"):
        Pipeline.from_pretrained(out, device="cpu")
    build_engine_dir(model=tiny_dir, out=out, options=LLM_ONLY)  # no force
    assert rank0.read_bytes() == good
    assert Pipeline.from_pretrained(out, device="cpu").generate([audio_turn(synthetic_audio(1.0))], max_new_tokens=2)


def test_same_size_corruption_of_an_output_is_rebuilt(tiny_dir, tmp_path):
    out = tmp_path / "e"
    build_engine_dir(model=tiny_dir, out=out, options=LLM_ONLY)
    cfg = out / "llm" / "checkpoint" / "config.json"
    good = cfg.read_bytes()
    cfg.write_bytes(good.replace(b'"qwen2"', b'"qwen3"'))
    assert cfg.stat().st_size == len(good)
    build_engine_dir(model=tiny_dir, out=out, options=LLM_ONLY)
    assert cfg.read_bytes() == good


def test_gpu_specific_stages_are_keyed_by_the_gpu(monkeypatch):
    import af3trt.build.engine_dir as ed

    o = BuildOptions()
    monkeypatch.setattr(ed, "gpu_identity", lambda: {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    h100 = {n: _stage_flags(n, o) for n in ("encoder_plan", "llm_engine", "llm_checkpoint")}
    monkeypatch.setattr(ed, "gpu_identity", lambda: {"name": "NVIDIA L40S", "compute_capability": "8.9"})
    l40 = {n: _stage_flags(n, o) for n in ("encoder_plan", "llm_engine", "llm_checkpoint")}
    assert h100["encoder_plan"] != l40["encoder_plan"] and h100["llm_engine"] != l40["llm_engine"]
    assert h100["llm_checkpoint"] == l40["llm_checkpoint"]  # GPU-independent
    assert h100["encoder_plan"]["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
