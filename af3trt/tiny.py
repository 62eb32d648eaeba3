"""Deterministic tiny random AF3 checkpoint in the exact layout of `nvidia/audio-flamingo-3-hf`.

`make_tiny_checkpoint(DIR, seed)` writes config.json (model_type audioflamingo3, audio_config +
text_config), model.safetensors with HF parameter names, generation_config.json, a byte-level BPE
tokenizer.json (trained here with `tokenizers`, Qwen-style pre-tokenizer, AF3's special tokens),
tokenizer_config.json, the AF3 chat templates, the feature-extractor/processor configs and think/
(AF3-Think: a PEFT LoRA + non_lora_trainables.bin, `make_tiny_think`). Same seed -> byte-identical
weights. It needs no AF3 classes of transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import fileio
from .checkpoint import hub_name
from .errors import ExistingOutputError, OptionError
from .spec import N_MELS, SAMPLE_RATE, ModelSpec

TINY_AUDIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
# hidden and every linear input width a multiple of 128 so INT4 AWQ (group 128) can run
TINY_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
TINY_BPE_VOCAB = 600  # trained BPE vocabulary before the special tokens
TINY_MAX_NEW_TOKENS = 64  # generation_config.json's max_new_tokens (AF3's own samples like this, with 2048)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>")

# Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKENIZER_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# AF3's processor template: list content -> ONE <sound> before the concatenated text parts
PROCESSOR_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """
You are a helpful assistant. Transcribe the input speech. Describe the audio in detail.
The spoken content of the audio is "hello world". The transcription of the audio is short.
The content of the input audio is a person speaking clearly about the weather today.
What is the speaker saying? Which instruments play in this music? Is there any background noise?
Audio Flamingo three listens to speech, sounds and music, and answers questions about them.
A quick brown fox jumps over the lazy dog while the birds sing in the morning light.
Please think and reason about the input audio before you respond. Summarize the conversation.
The engine runs on TensorRT and answers in a few milliseconds per token, 0 1 2 3 4 5 6 7 8 9.
Compare the first audio with the second audio. How many speakers are there, and what emotion?
"""


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _tokenizer_files(out: Path) -> dict[str, int]:
    tok = _train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<sound>"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<sound>"]}, indent=2))
    (out / "chat_template.jinja").write_text(PROCESSOR_CHAT_TEMPLATE)
    return ids


def _processor_files(out: Path) -> None:
    feature = {
        "chunk_length": 30, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": N_MELS, "hop_length": 160, "n_fft": 400, "n_samples": 480000,
        "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
        "return_attention_mask": True, "sampling_rate": SAMPLE_RATE,
    }
    processor = {
        "processor_class": "AudioFlamingo3Processor", "audio_token": "<sound>",
        "default_transcription_prompt": "Transcribe the input speech.", "max_audio_len": 600,
        "feature_extractor": feature,
    }
    (out / "preprocessor_config.json").write_text(json.dumps({**feature, "processor_class": "AudioFlamingo3Processor"}, indent=2))
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))


def _configs(ids: dict[str, int], vocab_size: int) -> tuple[dict, dict]:
    audio = {"model_type": "audioflamingo3_encoder", "activation_function": "gelu", "num_mel_bins": N_MELS,
             "max_source_positions": 1500, "scale_embedding": False, "dropout": 0.0,
             "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0,
             "initializer_range": 0.02, **TINY_AUDIO}
    text = {"model_type": "qwen2", "hidden_act": "silu", "vocab_size": vocab_size, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": TINY_TEXT["num_hidden_layers"],
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], **TINY_TEXT}
    config = {"architectures": ["AudioFlamingo3ForConditionalGeneration"], "model_type": "audioflamingo3",
              "audio_config": audio, "text_config": text, "audio_token_id": ids["<sound>"],
              "projector_hidden_act": "gelu", "projector_bias": True, "dtype": "float32"}
    generation = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": True,
                  "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
                  "max_new_tokens": TINY_MAX_NEW_TOKENS}
    return config, generation


def tiny_weights(config: dict, seed: int = 0) -> dict[str, "np.ndarray"]:
    """Random float32 weights with the HF hub names of an AF3 checkpoint (`audio_tower.*`, ...)."""
    rng = np.random.default_rng(seed)
    a, t = config["audio_config"], config["text_config"]
    d, f, h, i = a["hidden_size"], a["intermediate_size"], t["hidden_size"], t["intermediate_size"]
    hd = h // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * hd
    w: dict[str, np.ndarray] = {}

    def put(name, *shape, std=0.05, ones=False, zeros=False):
        if ones:
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif zeros:
            w[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = (std * rng.standard_normal(shape)).astype(np.float32)

    put("audio_tower.conv1.weight", d, a["num_mel_bins"], 3, std=0.1)
    put("audio_tower.conv1.bias", d, zeros=True)
    put("audio_tower.conv2.weight", d, d, 3, std=0.1)
    put("audio_tower.conv2.bias", d, zeros=True)
    put("audio_tower.embed_positions.weight", a["max_source_positions"], d, std=0.1)
    for n in range(a["num_hidden_layers"]):
        p = f"audio_tower.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            put(p + f"self_attn.{proj}.weight", d, d, std=0.1)
            if proj != "k_proj":  # Whisper's k_proj has no bias
                put(p + f"self_attn.{proj}.bias", d, zeros=True)
        put(p + "self_attn_layer_norm.weight", d, ones=True)
        put(p + "self_attn_layer_norm.bias", d, zeros=True)
        put(p + "fc1.weight", f, d, std=0.1)
        put(p + "fc1.bias", f, zeros=True)
        put(p + "fc2.weight", d, f, std=0.1)
        put(p + "fc2.bias", d, zeros=True)
        put(p + "final_layer_norm.weight", d, ones=True)
        put(p + "final_layer_norm.bias", d, zeros=True)
    put("audio_tower.layer_norm.weight", d, ones=True)
    put("audio_tower.layer_norm.bias", d, zeros=True)
    put("multi_modal_projector.linear_1.weight", h, d, std=0.1)
    put("multi_modal_projector.linear_1.bias", h, zeros=True)
    put("multi_modal_projector.linear_2.weight", h, h, std=0.1)
    put("multi_modal_projector.linear_2.bias", h, zeros=True)
    put("language_model.model.embed_tokens.weight", t["vocab_size"], h, std=1.0)
    for n in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{n}."
        put(p + "self_attn.q_proj.weight", h, h, std=0.1)
        put(p + "self_attn.q_proj.bias", h, zeros=True)
        put(p + "self_attn.k_proj.weight", kv, h, std=0.1)
        put(p + "self_attn.k_proj.bias", kv, zeros=True)
        put(p + "self_attn.v_proj.weight", kv, h, std=0.1)
        put(p + "self_attn.v_proj.bias", kv, zeros=True)
        put(p + "self_attn.o_proj.weight", h, h, std=0.1)
        put(p + "mlp.gate_proj.weight", i, h, std=0.1)
        put(p + "mlp.up_proj.weight", i, h, std=0.1)
        put(p + "mlp.down_proj.weight", h, i, std=0.1)
        put(p + "input_layernorm.weight", h, ones=True)
        put(p + "post_attention_layernorm.weight", h, ones=True)
    put("language_model.model.norm.weight", h, ones=True)
    put("language_model.lm_head.weight", t["vocab_size"], h, std=0.5)
    del hd
    return w


def _default_vocab(tokens: int) -> int:
    """The tiny model's default vocab: the tokenizer's size rounded up to 64, plus 64 spare rows
    (like the real 151672 > 151670 tokens); a multiple of 64, so no export pads it."""
    return -(-tokens // 64) * 64 + 64


def make_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, vocab_size: int | None = None) -> Path:
    """Write the tiny random AF3 checkpoint into `out_dir` (atomically: temp dir, then rename).

    vocab_size: rows of the LM's embedding and lm_head (text_config.vocab_size), at least the
    tokenizer's size (556 ids); None = the default (a multiple of 64). An odd one (e.g. 632 =
    64 * 9 + 56, like the real 151672 = 64 * 2369 + 56) is what ModelOpt pads for INT4 AWQ.
    """
    from safetensors.numpy import save_file

    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)):
        raise OptionError(f"expected vocab_size None or an int, got {vocab_size!r}")
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        cfg = json.loads((out / "config.json").read_text())
        meta, have = cfg.get("af3trt_tiny_seed"), cfg.get("af3trt_tiny_vocab_size")
        if meta == seed and have == vocab_size and cfg.get("af3trt_tiny_think") == tiny_think_key():
            return out
        if meta == seed and have == vocab_size:
            raise ExistingOutputError(f"{out} holds a tiny checkpoint of seed {seed} from another generator (think/ "
                                      f"key {cfg.get('af3trt_tiny_think')}, expected {tiny_think_key()}): remove it")
        raise ExistingOutputError(f"{out} already holds a checkpoint (tiny seed {meta}, vocab_size {have}); expected "
                                  f"seed {seed}, vocab_size {vocab_size}, or an empty dir")
    with fileio.staged_dir(out) as tmp:
        ids = _tokenizer_files(tmp)
        tokens = max(ids.values()) + 1
        if vocab_size is not None and vocab_size < tokens:
            raise OptionError(f"expected vocab_size >= {tokens} (the tiny tokenizer's ids), got {vocab_size}")
        config, generation = _configs(ids, _default_vocab(tokens) if vocab_size is None else vocab_size)
        config["af3trt_tiny_vocab_size"] = vocab_size
        config["af3trt_tiny_seed"] = seed
        _processor_files(tmp)
        save_file(tiny_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config["af3trt_tiny_think"] = tiny_think_key()
        make_tiny_think(tmp / "think", config, seed)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if out.exists():  # staged_dir fixes the modes safetensors made 0600, then renames tmp into place
            out.rmdir()  # only an empty dir may be replaced
    return out


def default_tiny_dir(seed: int = 0, vocab_size: int | None = None) -> Path:
    """Cache folder for `--model tiny` ($AF3TRT_CACHE or ~/.cache/af3trt), keyed by seed and vocab_size."""
    root = Path(os.environ.get("AF3TRT_CACHE", Path.home() / ".cache" / "af3trt"))
    vocab = "" if vocab_size is None else f"-vocab{vocab_size}"
    return root / f"tiny-seed{seed}{vocab}-think{tiny_think_key()[:8]}"


# -- AF3-Think: the think/ folder (PEFT LoRA + non-LoRA trainables), as the HF checkpoint ships it ---------

TINY_THINK = dict(
    version=1, r=8, lora_alpha=16, lora_std=0.1,
    # PEFT's regex form of target_modules: every linear of the LLM's layers, not the audio tower's
    target_modules=r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    # transformers' in-memory names (what `model.load_state_dict(..., strict=False)` takes): encoder,
    # projector and LLM tensors; o_proj is LoRA-adapted as well (non-LoRA applies first)
    non_lora=("model.audio_tower.layers.1.fc2.weight", "model.audio_tower.layer_norm.bias",
              "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias",
              "model.language_model.layers.1.self_attn.o_proj.weight", "model.language_model.norm.weight"),
)
THINK_LORA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_think_key() -> str:
    """Hash of what `make_tiny_think` generates: part of the tiny checkpoint's cache key."""
    import hashlib

    spec = {**TINY_THINK, "modules": THINK_LORA_MODULES}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def tiny_adapter_config(r: int, lora_alpha: int, target_modules) -> dict:
    """adapter_config.json as PEFT 0.21.2 writes it for a plain LoRA (`LoraConfig(...).save_pretrained`)."""
    off = ("alora_invocation_tokens", "arrow_config", "auto_mapping", "base_model_name_or_path", "corda_config",
           "eva_config", "exclude_modules", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
           "lora_ga_config", "megatron_config", "modules_to_save", "monteclora_config", "revision", "target_parameters",
           "trainable_token_indices", "use_bdlora", "velora_config")
    return {**{k: None for k in off}, "alpha_pattern": {}, "bias": "none", "ensure_weight_tying": False,
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "loftq_config": {},
            "lora_alpha": lora_alpha, "lora_bias": False, "lora_dropout": 0.05, "megatron_core": "megatron.core",
            "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": r, "rank_pattern": {},
            "target_modules": target_modules, "task_type": "CAUSAL_LM", "use_dora": False, "use_qalora": False,
            "use_rslora": False}


def _umask_mode(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def make_tiny_think(out: Path, config: dict, seed: int = 0) -> Path:
    """Write `out` (CKPT/think): adapter_config.json + adapter_model.safetensors (PEFT's key names for
    AudioFlamingo3ForConditionalGeneration: `base_model.model.model.language_model.layers.N.<module>.
    lora_{A,B}.weight`) and non_lora_trainables.bin (torch.save of {in-memory name: tensor}). Same seed,
    same bytes; lora_B is random (not PEFT's zero init) so the adapter changes the answers."""
    import torch
    from safetensors.numpy import save_file

    rng = np.random.default_rng([seed, 14])  # a stream of its own: the base weights stay as they were
    t = config["text_config"]
    r, std = TINY_THINK["r"], TINY_THINK["lora_std"]
    base = tiny_weights(config, seed)
    out.mkdir(parents=True, exist_ok=True)
    lora = {}
    for n in range(t["num_hidden_layers"]):
        for module in THINK_LORA_MODULES:
            name = f"model.language_model.layers.{n}.{module}"
            rows, cols = base[hub_name(name + ".weight")].shape
            lora[f"base_model.model.{name}.lora_A.weight"] = (std * rng.standard_normal((r, cols))).astype(np.float32)
            lora[f"base_model.model.{name}.lora_B.weight"] = (std * rng.standard_normal((rows, r))).astype(np.float32)
    save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _umask_mode(out / "adapter_model.safetensors")  # safetensors writes 0600 whatever the umask
    adapter = tiny_adapter_config(r, TINY_THINK["lora_alpha"], TINY_THINK["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(adapter, indent=2, sort_keys=True))
    non_lora = {}
    for name in TINY_THINK["non_lora"]:
        like = base[hub_name(name)]
        scale = float(like.std()) or 0.05
        non_lora[name] = torch.from_numpy((like.mean() + scale * rng.standard_normal(like.shape)).astype(np.float32))
    torch.save(non_lora, out / "non_lora_trainables.bin")
    return out


# --------------------------------------------------------------------------- the full-size AF3 config
# The shapes of `nvidia/audio-flamingo-3-hf` (DESIGN §1, reference/af3.md), at `scale` for random-weight
# benchmarks (`af3trt.benchmark.random_model`) and for floors (`full_spec`).
FULL_AUDIO = {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20, "intermediate_size": 5120}
FULL_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 151672}
AUDIO_HEAD_DIM = 64  # 1280 / 20
TEXT_HEAD_DIM = 128  # 3584 / 28
WIDTH_MULTIPLE = 64  # scaled FFN widths stay multiples of 64


def _scaled(n: int, scale: float, multiple: int = 1, minimum: int = 1) -> int:
    return max(minimum, int(round(n * scale / multiple)) * multiple)


def random_config(scale: float = 1.0, *, audio_token_id: int, eos_token_id: int, pad_token_id: int,
                  min_vocab: int = 0) -> dict:
    """AF3 config.json (HF layout) at `scale` of the real size; scale 1.0 is exact."""
    if not 0 < scale <= 1:
        raise OptionError(f"expected 0 < scale <= 1, got {scale}")
    audio_heads = _scaled(FULL_AUDIO["num_attention_heads"], scale)
    kv = _scaled(FULL_TEXT["num_key_value_heads"], scale)
    heads = max(kv, _scaled(FULL_TEXT["num_attention_heads"], scale) // kv * kv)
    vocab = max(min_vocab, _scaled(FULL_TEXT["vocab_size"], scale))
    audio = {"model_type": "audioflamingo3_encoder", "activation_function": "gelu", "num_mel_bins": N_MELS,
             "max_source_positions": 1500, "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0,
             "activation_dropout": 0.0, "layerdrop": 0.0, "initializer_range": 0.02,
             "hidden_size": audio_heads * AUDIO_HEAD_DIM,
             "num_hidden_layers": _scaled(FULL_AUDIO["num_hidden_layers"], scale),
             "num_attention_heads": audio_heads,
             "intermediate_size": _scaled(FULL_AUDIO["intermediate_size"], scale, WIDTH_MULTIPLE, WIDTH_MULTIPLE)}
    text = {"model_type": "qwen2", "hidden_act": "silu", "vocab_size": vocab, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": True, "hidden_size": heads * TEXT_HEAD_DIM,
            "intermediate_size": _scaled(FULL_TEXT["intermediate_size"], scale, WIDTH_MULTIPLE, WIDTH_MULTIPLE),
            "num_hidden_layers": _scaled(FULL_TEXT["num_hidden_layers"], scale), "num_attention_heads": heads,
            "num_key_value_heads": kv, "bos_token_id": pad_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id}
    text["max_window_layers"] = text["num_hidden_layers"]
    return {"architectures": ["AudioFlamingo3ForConditionalGeneration"], "model_type": "audioflamingo3",
            "audio_config": audio, "text_config": text, "audio_token_id": audio_token_id,
            "projector_hidden_act": "gelu", "projector_bias": True}


def full_spec() -> ModelSpec:
    """ModelSpec of the real AF3 (with the published special-token ids) for floors and docs."""
    return ModelSpec.from_config(random_config(1.0, audio_token_id=151669, eos_token_id=151645, pad_token_id=151643))
