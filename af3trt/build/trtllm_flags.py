"""The `trtllm-build` command line of the pinned TensorRT-LLM (1.x engine flow) as data, and its validator.

Source: NVIDIA/TensorRT-LLM `tensorrt_llm/commands/build.py` @ 65f1d1536e18 (1.x, the newest read;
no auto-parallel flags), size defaults from `BuildConfig` in `tensorrt_llm/builder.py` and plugin
flags from `PluginConfig` / `add_plugin_argument()` in `tensorrt_llm/plugin/plugin.py`, as recorded
in shared/reference/trtllm.md §1b. Anything not in this table is rejected: a typo or a flag of
another release fails here, in CI, instead of on the GPU machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import OptionError

PROGRAM = "trtllm-build"

PATH, STR, INT, CHOICE, SWITCH, PATHS, STRS = "path", "str", "int", "choice", "switch", "paths", "strs"
KINDS = (PATH, STR, INT, CHOICE, SWITCH, PATHS, STRS)


@dataclass(frozen=True)
class Flag:
    """kind: path|str|int|choice|switch (store_true)|paths|strs (nargs='+'); minimum for ints;
    alias_of: the canonical flag; deprecated: why it is refused (with the replacement)."""

    kind: str
    default: object = None
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    alias_of: str | None = None
    deprecated: str | None = None


ENABLE = ("enable", "disable")
PLUGIN_DTYPES = ("auto", "float16", "float32", "bfloat16", "int32", "disable")  # `auto` = checkpoint dtype


def _dtype_plugin(default):
    return Flag(CHOICE, default, PLUGIN_DTYPES)


def _feature(default):
    return Flag(CHOICE, default, ENABLE)


_GENERAL = {
    "checkpoint_dir": Flag(PATH),
    "model_config": Flag(PATH),
    "build_config": Flag(PATH),
    "model_cls_file": Flag(PATH),
    "model_cls_name": Flag(STR),
    "output_dir": Flag(PATH, "engine_outputs"),
    "max_batch_size": Flag(INT, 2048, minimum=1),
    "max_input_len": Flag(INT, 1024, minimum=1),
    "max_seq_len": Flag(INT, None, minimum=1),  # None: deduced from max_position_embeddings
    "max_decoder_seq_len": Flag(INT, None, minimum=1, alias_of="max_seq_len"),
    "max_beam_width": Flag(INT, 1, minimum=1),
    "max_num_tokens": Flag(INT, 8192, minimum=1),
    "opt_num_tokens": Flag(INT, None, minimum=1),
    "max_encoder_input_len": Flag(INT, 1024, minimum=1),
    "max_prompt_embedding_table_size": Flag(INT, 0, minimum=0),  # > 0 enables prompt tables
    "max_multimodal_len": Flag(INT, 0, minimum=0, alias_of="max_prompt_embedding_table_size"),
    "kv_cache_type": Flag(CHOICE, "paged", ("continuous", "paged", "disabled")),
    "paged_kv_cache": Flag(CHOICE, None, ENABLE, deprecated="use --kv_cache_type paged"),
    "input_timing_cache": Flag(PATH),
    "output_timing_cache": Flag(PATH, "model.cache"),
    "profiling_verbosity": Flag(CHOICE, "layer_names_only", ("layer_names_only", "detailed", "none")),
    "strip_plan": Flag(SWITCH, False),
    "weight_sparsity": Flag(SWITCH, False),
    "weight_streaming": Flag(SWITCH, False),
    "fast_build": Flag(SWITCH, False),
    "workers": Flag(INT, 1, minimum=1),
    "log_level": Flag(STR, "info"),
    "enable_debug_output": Flag(SWITCH, False),
    "visualize_network": Flag(PATH),
    "dry_run": Flag(SWITCH, False),
    "monitor_memory": Flag(SWITCH, False),
    # logits
    "logits_dtype": Flag(CHOICE, None, ("float16", "float32")),
    "gather_context_logits": Flag(SWITCH, False),
    "gather_generation_logits": Flag(SWITCH, False, deprecated="use --output_generation_logits at runtime"),
    "gather_all_token_logits": Flag(SWITCH, False),
    # LoRA
    "lora_dir": Flag(PATHS),
    "lora_ckpt_source": Flag(CHOICE, "hf", ("hf", "nemo")),
    "lora_target_modules": Flag(STRS),
    "max_lora_rank": Flag(INT, 64, minimum=1),
    # speculative decoding
    "speculative_decoding_mode": Flag(CHOICE, None, ("draft_tokens_external", "lookahead_decoding", "medusa",
                                                     "explicit_draft_tokens", "eagle")),
    "max_draft_len": Flag(INT, 0, minimum=0),
}

_PLUGINS = {
    "bert_attention_plugin": _dtype_plugin("auto"),
    "gpt_attention_plugin": _dtype_plugin("auto"),
    "gemm_plugin": Flag(CHOICE, None, ("auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable")),
    "gemm_swiglu_plugin": Flag(CHOICE, "disable", ("fp8", "disable")),
    "fp8_rowwise_gemm_plugin": _dtype_plugin("disable"),
    "lora_plugin": _dtype_plugin("disable"),
    "dora_plugin": _feature("disable"),
    "moe_plugin": _dtype_plugin("auto"),
    "mamba_conv1d_plugin": _dtype_plugin("auto"),
    "nccl_plugin": _dtype_plugin("auto"),
    "low_latency_gemm_plugin": Flag(CHOICE, "disable", ("fp8", "disable")),
    "low_latency_gemm_swiglu_plugin": Flag(CHOICE, "disable", ("fp8", "disable")),
    "gemm_allreduce_plugin": Flag(CHOICE, "disable", ("float16", "bfloat16", "disable")),
    "context_fmha": _feature("enable"),
    "bert_context_fmha_fp32_acc": _feature("disable"),
    "remove_input_padding": _feature("enable"),
    "tokens_per_block": Flag(INT, 32, minimum=1),
    "use_paged_context_fmha": _feature("enable"),
    "use_fp8_context_fmha": _feature("enable"),  # effective only with FP8 quantization / KV
    "fuse_fp4_quant": _feature("disable"),
    "multiple_profiles": _feature("disable"),
    "paged_state": _feature("enable"),
    "streamingllm": _feature("disable"),
    "norm_quant_fusion": _feature("disable"),
    "reduce_fusion": _feature("disable"),
    "user_buffer": _feature("disable"),
    "use_fused_mlp": _feature("enable"),  # build.py forces it off unless quant_algo in {None, FP8, MIXED}
    "pp_reduce_scatter": _feature("disable"),
}

TRTLLM_BUILD_FLAGS: Mapping[str, Flag] = MappingProxyType({**_GENERAL, **_PLUGINS})


class FlagError(OptionError):
    """A `trtllm-build` flag or value that the pinned release does not accept."""


def validate_flag(name: str, value: object = True) -> str | list[str] | None:
    """Check one flag (name without dashes) and return its argv value(s): None for a switch."""
    flag = TRTLLM_BUILD_FLAGS.get(name)
    if flag is None:
        raise FlagError(f"unknown trtllm-build flag --{name}; expected one of the pinned table "
                        f"({len(TRTLLM_BUILD_FLAGS)} flags, e.g. --max_input_len)")
    if flag.deprecated:
        raise FlagError(f"--{name} is deprecated in the pinned trtllm-build: {flag.deprecated}")
    if flag.kind == SWITCH:
        if value is not True:
            raise FlagError(f"--{name} is a switch (store_true): expected value True, got {value!r}")
        return None
    if flag.kind in (PATHS, STRS):
        values = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
        if not values or not all(isinstance(v, str) and v for v in values):
            raise FlagError(f"--{name} takes one or more non-empty strings, got {value!r}")
        return values
    if isinstance(value, bool) or value is None:
        raise FlagError(f"--{name} takes a {flag.kind} value, got {value!r}")
    text = str(value)
    if flag.kind == INT:
        try:
            number = int(text)
        except ValueError:
            raise FlagError(f"--{name} takes an integer, got {value!r}") from None
        if flag.minimum is not None and number < flag.minimum:
            raise FlagError(f"--{name} must be >= {flag.minimum}, got {number}")
        return str(number)
    if flag.kind == CHOICE and text not in flag.choices:
        raise FlagError(f"--{name} accepts {list(flag.choices)}, got {text!r}")
    if not text:
        raise FlagError(f"--{name} takes a non-empty {flag.kind}, got ''")
    return text


def build_argv(flags: Mapping[str, object]) -> list[str]:
    """`trtllm-build` argv from {flag: value} (insertion order kept; True for switches), validated."""
    argv = [PROGRAM]
    seen: dict[str, str] = {}
    for name, value in flags.items():
        out = validate_flag(name, value)
        canonical = TRTLLM_BUILD_FLAGS[name].alias_of or name
        if canonical in seen:
            raise FlagError(f"--{name} repeats --{seen[canonical]}: expected each flag once")
        seen[canonical] = name
        argv.append(f"--{name}")
        if out is not None:
            argv.extend(out if isinstance(out, list) else [out])
    return argv


def parse_argv(argv: Sequence[str]) -> dict[str, object]:
    """Validate a full `trtllm-build ...` argv and return {flag: value} (True for switches)."""
    if not argv or argv[0] != PROGRAM:
        raise FlagError(f"expected an argv starting with {PROGRAM!r}, got {list(argv[:1])}")
    flags: dict[str, object] = {}
    i = 1
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise FlagError(f"expected a --flag at argv[{i}], got {token!r}")
        name, eq, inline = token[2:].partition("=")
        flag = TRTLLM_BUILD_FLAGS.get(name)
        if flag is None:
            validate_flag(name)  # raises the unknown-flag error
        values: list[str] = [inline] if eq else []
        i += 1
        if not eq and flag.kind != SWITCH:
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
                if flag.kind not in (PATHS, STRS):
                    break
        if flag.kind == SWITCH:
            value: object = True if not values else values[0]
        elif flag.kind in (PATHS, STRS):
            value = values
        else:
            if len(values) != 1:
                raise FlagError(f"--{name} takes exactly one value, got {values}")
            value = values[0]
        if name in flags:
            raise FlagError(f"--{name} given twice: expected each flag once")
        flags[name] = value
    build_argv(flags)  # value checks + duplicates (argv order preserved by the dict)
    return flags
