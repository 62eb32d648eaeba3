"""Decoder build stage: precision registry, trtllm-build flag table and argv, ModelOpt -> TensorRT-LLM
checkpoint export, and the read-back (TP merge + dequantization) that the torch decoder backend uses."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from af3trt.build import llm
from af3trt.formats import trtllm_checkpoint as tckpt
from af3trt.formats.precision import (
    KV_CACHES, PRECISIONS, get_kv_cache, get_precision, resolve_dtype, trtllm_quantization,
)
from af3trt.build.precision import KV_QUANTIZER, modelopt_quant_config
from af3trt.build.trtllm_flags import TRTLLM_BUILD_FLAGS, FlagError, build_argv, parse_argv

# Relative logits error ||l - l_ref|| / ||l_ref|| against the bf16 reference on the tiny random model
# (2 layers, random N(0, 0.1) weights: no outliers for AWQ/SmoothQuant to exploit, so these are
# worst-case-like). Weight rounding only; activation and KV-cache quantization are not simulated.
LOGIT_BUDGET = {"int8_wo": 0.04, "int8_sq": 0.05, "fp8": 0.15, "int4_awq": 0.45}
QUANTIZED_CASES = [("fp8", "fp8"), ("int8_wo", "int8"), ("int8_sq", "auto"), ("int4_awq", "int8")]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def lm(tiny_dir):
    """bf16-rounded reference (run in float32), calibration batches and evaluation ids."""
    ref = llm.load_qwen2_from_af3(tiny_dir, "bfloat16").float()
    emb = ref.model.embed_tokens.weight.detach()
    gen = torch.Generator().manual_seed(0)
    calib = []
    for _ in range(3):
        ids = torch.randint(0, emb.shape[0], (2, 32), generator=gen)
        mask = torch.ones(2, 32, dtype=torch.long)
        mask[1, :5] = 0  # a left-padded row, as batched prompts are
        calib.append({"inputs_embeds": emb[ids], "attention_mask": mask})
    ids = torch.randint(0, emb.shape[0], (2, 24), generator=gen)
    with torch.no_grad():
        logits = ref(input_ids=ids).logits
    return SimpleNamespace(ref=ref, calib=calib, ids=ids, logits=logits, state=ref.state_dict())


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory, lm):
    """export(precision, kv_cache, tp) -> checkpoint dir, each combination exported once per module."""
    root, cache = tmp_path_factory.mktemp("trtllm"), {}

    def export(precision, kv_cache="auto", tp_size=1):
        key = (precision, kv_cache, tp_size)
        if key not in cache:
            cache[key] = llm.export_checkpoint(
                checkpoint_dir=tiny_dir, out_dir=root / f"{precision}-{kv_cache}-tp{tp_size}", precision=precision,
                kv_cache=kv_cache, tp_size=tp_size, calib_batches=lm.calib, device="cpu")
        return cache[key]

    return export


def logits_of(ckpt_dir, ids):
    cfg, state = tckpt.load_trtllm_checkpoint(ckpt_dir)
    model = llm.build_qwen2(tckpt.text_spec(cfg), state, "float32")
    with torch.no_grad():
        return cfg, state, model(input_ids=ids).logits


# ----------------------------------------------------------------------------- registry


def test_unknown_precision_and_kv_cache_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown decoder precision 'int3'.*'bf16'.*'int4_awq'"):
        get_precision("int3")
    with pytest.raises(ValueError, match=r"unknown KV-cache format 'fp4'.*\['auto', 'fp8', 'int8'\]"):
        get_kv_cache("fp4")
    assert set(PRECISIONS) == {"bf16", "fp16", "fp8", "int8_wo", "int8_sq", "int4_awq"}
    with pytest.raises(Exception):
        PRECISIONS["bf16"].quant_algo = "FP8"  # frozen


def test_quantization_blocks_are_what_trtllm_reads():
    expected = {  # reference/trtllm.md §2.1-2.4: QuantAlgo values and ModelOpt's per-format extras
        "bf16": (None, False, None), "fp16": (None, False, None), "fp8": ("FP8", False, ["lm_head"]),
        "int8_wo": ("W8A16", False, None), "int8_sq": ("W8A8_SQ_PER_CHANNEL", False, ["lm_head"]),
        "int4_awq": ("W4A16_AWQ", True, ["lm_head"]),
    }
    for name, (algo, pre_quant_scale, exclude) in expected.items():
        for kv, kv_algo in (("auto", None), ("fp8", "FP8"), ("int8", "INT8")):
            assert trtllm_quantization(name, kv) == {
                "quant_algo": algo, "kv_cache_quant_algo": kv_algo, "group_size": 128, "has_zero_point": False,
                "pre_quant_scale": pre_quant_scale, "exclude_modules": exclude}
    assert resolve_dtype("fp16") == "float16" and resolve_dtype("int8_sq", "float16") == "float16"
    assert resolve_dtype("fp8") == "bfloat16"
    with pytest.raises(ValueError, match="fixes dtype 'bfloat16', got dtype 'float16'"):
        resolve_dtype("bf16", "float16")


def test_modelopt_configs_come_from_named_presets_untouched():
    import modelopt.torch.quantization as mtq

    before = {n: copy.deepcopy(getattr(mtq, n)) for n in ("FP8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG",
                                                          "INT4_AWQ_CFG", "FP8_KV_CFG")}
    for name in PRECISIONS:
        for kv in KV_CACHES:
            cfg = modelopt_quant_config(name, kv)
            quantizes = PRECISIONS[name].modelopt_cfg or KV_CACHES[kv].kv_cache_quant_algo
            assert (cfg is None) == (not quantizes), (name, kv)
            if cfg is not None:
                assert (KV_QUANTIZER in str(cfg)) == (kv != "auto"), (name, kv)
    assert modelopt_quant_config("int4_awq") == mtq.INT4_AWQ_CFG
    assert {n: getattr(mtq, n) for n in before} == before


# ----------------------------------------------------------------------------- flags and argv


def test_flag_table_rejects_what_the_pinned_trtllm_build_would():
    assert TRTLLM_BUILD_FLAGS["max_input_len"].default == 1024
    assert TRTLLM_BUILD_FLAGS["use_paged_context_fmha"].choices == ("enable", "disable")
    ok = parse_argv(["trtllm-build", "--checkpoint_dir", "c", "--gemm_plugin=auto", "--strip_plan",
                     "--lora_dir", "a", "b", "--max_batch_size", "4"])
    assert ok == {"checkpoint_dir": "c", "gemm_plugin": "auto", "strip_plan": True, "lora_dir": ["a", "b"],
                  "max_batch_size": "4"}
    bad = {
        "unknown trtllm-build flag --max_batch": ["--max_batch", "4"],
        "accepts .* got 'fp64'": ["--gemm_plugin", "fp64"],
        "takes an integer, got 'x'": ["--max_input_len", "x"],
        "must be >= 1, got 0": ["--max_batch_size", "0"],
        "deprecated.*kv_cache_type paged": ["--paged_kv_cache", "enable"],
        "given twice": ["--workers", "1", "--workers", "2"],
        "repeats --max_seq_len": ["--max_seq_len", "9", "--max_decoder_seq_len", "9"],
        "accepts \\['enable', 'disable'\\], got 'on'": ["--context_fmha", "on"],
    }
    for message, args in bad.items():
        with pytest.raises(FlagError, match=message):
            parse_argv(["trtllm-build", *args])
    with pytest.raises(FlagError, match="expected an argv starting with 'trtllm-build'"):
        parse_argv(["trtllm_build"])
    with pytest.raises(FlagError, match="switch"):
        build_argv({"strip_plan": "yes"})


def test_build_command_for_ten_minutes_at_batch_eight():
    limits = llm.EngineLimits(max_batch_size=8, max_audio_seconds=600, max_text_tokens=1024, max_new_tokens=512)
    assert limits.audio_tokens_per_request == 15_000
    argv = llm.trtllm_build_command("ck", "eng", limits, "fp8", kv_cache="fp8")
    print(" ".join(argv))
    flags = parse_argv(argv)  # every flag and value is in the pinned table
    assert argv[:5] == ["trtllm-build", "--checkpoint_dir", "ck", "--output_dir", "eng"]
    assert flags["max_prompt_embedding_table_size"] == "120000"
    assert flags["max_input_len"] == str(15_000 + 1024)
    assert flags["max_seq_len"] == str(15_000 + 1024 + 512)
    assert flags["max_num_tokens"] == flags["max_input_len"] and flags["max_batch_size"] == "8"
    assert {k: flags[k] for k in ("kv_cache_type", "use_paged_context_fmha", "remove_input_padding", "context_fmha",
                                  "use_fp8_context_fmha", "gemm_plugin", "gpt_attention_plugin")} == {
        "kv_cache_type": "paged", "use_paged_context_fmha": "enable", "remove_input_padding": "enable",
        "context_fmha": "enable", "use_fp8_context_fmha": "enable", "gemm_plugin": "auto",
        "gpt_attention_plugin": "auto"}
    assert parse_argv(llm.trtllm_build_command("ck", "eng", limits, "bf16"))["use_fp8_context_fmha"] == "disable"
    assert llm.EngineLimits(max_audio_seconds=30).prompt_table_size == 750
    for bad in ({"max_audio_seconds": 601}, {"max_batch_size": 0}, {"max_new_tokens": 1.5}):
        with pytest.raises(ValueError, match="EngineLimits"):
            llm.EngineLimits(**bad)
    with pytest.raises(ValueError, match="unknown decoder precision"):
        llm.trtllm_build_command("ck", "eng", limits, "int2")


# ----------------------------------------------------------------------------- checkpoint mapping


def test_name_mapping_round_trips(lm):
    spec = lm.ref.config
    hd = spec.hidden_size // spec.num_attention_heads
    trt = tckpt.hf_to_trtllm_names(lm.state)
    assert "transformer.layers.1.attention.qkv.bias" in trt and "transformer.layers.0.mlp.fc.weight" in trt
    assert torch.equal(trt["transformer.layers.0.mlp.fc.weight"], lm.state["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(trt["transformer.layers.0.mlp.gate.weight"], lm.state["model.layers.0.mlp.up_proj.weight"])
    back = tckpt.trtllm_to_hf_names(trt, spec.num_attention_heads, spec.num_key_value_heads, hd)
    assert back.keys() == lm.state.keys()
    assert all(torch.equal(back[k], lm.state[k]) for k in back)


def test_dequantization_inverts_modelopt_weight_formats():
    from modelopt.torch.export.quant_utils import to_quantized_weight

    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.1
    group = w.abs().reshape(256, 2, 128).amax(-1) / 7  # (out, in / 128) INT4 group scales
    packed = to_quantized_weight(w, group, "int4_awq", block_size=128)
    assert packed.shape == (128, 256)
    pqs = torch.rand(256) + 0.5
    tensors = {"x.weight": packed, "x.weights_scaling_factor": group, "x.prequant_scaling_factor": pqs}
    got = tckpt._dequantize_linear(tensors, "x", {"quant_algo": "W4A16_AWQ", "group_size": 128}, "bfloat16")
    want = (w / group.repeat_interleave(128, 1)).round().clamp(-8, 7) * group.repeat_interleave(128, 1) * pqs
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    channel = w.abs().amax(1) / 127
    q8 = to_quantized_weight(w, channel, "int8_sq")
    got = tckpt._dequantize_linear({"x.weight": q8, "x.weights_scaling_factor": channel}, "x",
                                 {"quant_algo": "W8A8_SQ_PER_CHANNEL"}, "bfloat16")
    torch.testing.assert_close(got, (w / channel[:, None]).round() * channel[:, None], rtol=1e-6, atol=1e-7)
    tensor = w.abs().amax() / 448
    f8 = to_quantized_weight(w, tensor.reshape(1), "fp8")
    got = tckpt._dequantize_linear({"x.weight": f8, "x.weights_scaling_factor": tensor.reshape(1)}, "x",
                                 {"quant_algo": "FP8"}, "bfloat16")
    torch.testing.assert_close(got, (w / tensor).to(torch.float8_e4m3fn).float() * tensor)


# ----------------------------------------------------------------------------- export + read back


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_unquantized_export_round_trips_exactly(exported, lm, tiny_dir, precision, dtype):
    from af3trt.spec import ModelSpec

    text = ModelSpec.from_dir(tiny_dir).text
    cfg, state = tckpt.load_trtllm_checkpoint(exported(precision))
    assert {k: cfg[k] for k in ("architecture", "qwen_type", "dtype", "rotary_base", "norm_epsilon",
                                "intermediate_size", "vocab_size", "num_key_value_heads", "head_size")} == {
        "architecture": "Qwen2ForCausalLM", "qwen_type": "qwen2", "dtype": str(dtype).split(".")[1],
        "rotary_base": text.rope_theta, "norm_epsilon": text.rms_norm_eps, "intermediate_size": text.intermediate_size,
        "vocab_size": text.vocab_size, "num_key_value_heads": text.num_kv_heads, "head_size": text.head_dim}
    assert cfg["quantization"] == trtllm_quantization(precision)
    from af3trt.checkpoint import Checkpoint

    source = Checkpoint.open(tiny_dir).load("language_model.")
    assert state.keys() == source.keys()
    diff = max((state[k] - source[k].to(dtype).float()).abs().max().item() for k in state)
    print(f"{precision}: max |checkpoint - source rounded to {dtype}| = {diff}")
    assert diff == 0.0


@pytest.mark.parametrize("precision,kv_cache", QUANTIZED_CASES)
def test_quantized_export_config_and_logits_budget(exported, lm, precision, kv_cache):
    from safetensors import safe_open

    path = exported(precision, kv_cache)
    cfg, state, logits = logits_of(path, lm.ids)
    assert cfg["quantization"] == trtllm_quantization(precision, kv_cache)
    assert cfg["architecture"] == "Qwen2ForCausalLM" and cfg["qwen_type"] == "qwen2"
    with safe_open(str(path / "rank0.safetensors"), framework="pt") as f:
        qkv = f.get_tensor("transformer.layers.0.attention.qkv.weight")
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16  # exclude_modules: lm_head stays bf16
        keys = set(f.keys())
    want_dtype = {"fp8": torch.float8_e4m3fn, "int8_wo": torch.bfloat16, "int8_sq": torch.int8,
                  "int4_awq": torch.int8}[precision]
    assert qkv.dtype == want_dtype
    rows = (lm.ref.config.num_attention_heads + 2 * lm.ref.config.num_key_value_heads) * 32
    assert qkv.shape[0] == (rows // 2 if precision == "int4_awq" else rows)
    assert ("transformer.layers.0.attention.kv_cache_scaling_factor" in keys) == (kv_cache != "auto")
    assert ("transformer.layers.0.mlp.proj.prequant_scaling_factor" in keys) == (precision in ("int8_sq", "int4_awq"))
    err, top1 = rel_err(logits, lm.logits), (logits.argmax(-1) == lm.logits.argmax(-1)).float().mean().item()
    print(f"{precision}/{kv_cache}: rel logits err {err:.4f} (budget {LOGIT_BUDGET[precision]}), "
          f"max abs {(logits - lm.logits).abs().max():.3f}, top-1 agreement {top1:.3f}")
    assert 0 < err <= LOGIT_BUDGET[precision]
    if precision == "int8_wo":  # trtllm-build's per-channel int8: error <= one step per output row
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
            src = lm.state[name]
            step = src.abs().amax(1, keepdim=True) / 127
            assert ((state[name] - src).abs() <= step).all()


def test_budgets_rank_precisions():
    assert LOGIT_BUDGET["int8_wo"] < LOGIT_BUDGET["int8_sq"] < LOGIT_BUDGET["fp8"] < LOGIT_BUDGET["int4_awq"]


@pytest.mark.parametrize("precision", ["bf16", "int8_sq"])
def test_tensor_parallel_ranks_merge_back_to_tp1(exported, precision):
    tp2 = exported(precision, "auto", 2)
    assert sorted(p.name for p in tp2.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    cfg2, state2 = tckpt.load_trtllm_checkpoint(tp2)
    cfg1, state1 = tckpt.load_trtllm_checkpoint(exported(precision, "auto", 1))
    assert cfg2["mapping"]["tp_size"] == 2 and cfg2["quantization"] == cfg1["quantization"]
    assert not (tp2 / "quant_cfg.json").exists()
    assert state2.keys() == state1.keys()
    worst = max((state2[k] - state1[k]).abs().max().item() for k in state1)
    print(f"{precision}: max |tp2 merged - tp1| = {worst}")
    assert worst == 0.0


def test_export_fails_early_and_replaces_atomically(exported, tiny_dir, lm, tmp_path):
    with pytest.raises(ValueError, match="needs calib_batches"):
        llm.export_checkpoint(checkpoint_dir=tiny_dir, out_dir=tmp_path / "x", precision="fp8")
    with pytest.raises(ValueError, match="tp_size"):
        llm.export_checkpoint(checkpoint_dir=tiny_dir, out_dir=tmp_path / "x", precision="bf16", tp_size=3)
    wrong_width = [{"inputs_embeds": torch.zeros(1, 4, 64), "attention_mask": torch.ones(1, 4)}]
    with pytest.raises(ValueError, match=r"inputs_embeds float \[B, T, 128\]"):
        llm.export_checkpoint(checkpoint_dir=tiny_dir, out_dir=tmp_path / "x", precision="int8_sq", device="cpu",
                              calib_batches=wrong_width)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    llm.export_checkpoint(checkpoint_dir=tiny_dir, out_dir=out, precision="bf16", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "rank0.safetensors"]
    assert json.loads((out / "config.json").read_text())["quantization"]["quant_algo"] is None
