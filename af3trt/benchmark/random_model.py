"""Full-size AF3 with random weights, built on the device, for latency benchmarks (`--random-weights`).

No checkpoint is written or read: the shapes are those of `nvidia/audio-flamingo-3-hf`
(`af3trt.tiny.random_config`; DESIGN §1, reference/af3.md) — encoder d 1280, 32 layers, 20 heads, ffn 5120; projector
1280 -> 3584 -> 3584; Qwen2.5-7B LM: hidden 3584, ffn 18944, 28 layers, 28 heads, 4 KV heads,
vocab 151672 — and the tokenizer is the tiny checkpoint's (its ids are valid ids of the large
vocabulary; `<sound>` is its own id). Timing does not depend on weight values.

When transformers' AF3 model is wanted (the `hf` backends), it is built first (random init on the
device) and af3trt's encoder and decoder are created on the meta device and then given the very
same tensors (`load_state_dict(assign=True)`): both backends read one copy of the weights. Without
it af3trt's modules are initialized on the device directly.

`scale` < 1 shrinks layer counts, head counts (head dims stay 64 / 128), FFN widths and the
vocabulary for CPU tests; `scale=1` is the real size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import ENCODER_PREFIX, LM_PREFIX, PROJECTOR_PREFIX, hub_name
from ..errors import OptionError
from ..prompt import PromptBuilder
from ..runtime.decoder import Qwen2Decoder, TorchDecoder
from ..runtime.encoder import AudioEncoder, TorchEncoder
from ..runtime.generation import GenerationDefaults
from ..runtime.pipeline import Pipeline
from ..spec import ModelSpec
from ..tiny import default_tiny_dir, full_spec, make_tiny_checkpoint, random_config
from .floor import lm_params

__all__ = ["RandomModels", "available_bytes", "build", "build_hf", "check_fits", "full_spec", "hf_available",
           "modules_from_hf", "modules_on_device", "random_config", "weight_bytes"]  # full_spec, random_config: af3trt.tiny


@dataclass
class RandomModels:
    """What `build` returns. pipeline: af3trt's torch Pipeline; hf / processor: transformers' AF3
    model and processor (None when not requested or unavailable); weights: how the two relate."""

    config: dict
    spec: ModelSpec
    pipeline: object
    hf: object | None
    processor: object | None
    weights: str
    tokenizer_dir: Path


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _tokenizer_ids(tokenizer_dir: Path) -> dict:
    config = json.loads((tokenizer_dir / "config.json").read_text())
    generation = json.loads((tokenizer_dir / "generation_config.json").read_text())
    return {"audio_token_id": int(config["audio_token_id"]), "eos_ids": list(generation["eos_token_id"]),
            "pad_token_id": int(generation["pad_token_id"]), "min_vocab": int(config["text_config"]["vocab_size"])}


def hf_available() -> str | None:
    """None when transformers has AF3 (>= 5), else why not."""
    try:
        import transformers.models.audioflamingo3  # noqa: F401
    except ImportError:
        import transformers

        return f"transformers {transformers.__version__} has no AudioFlamingo3 (needs >= 5)"
    return None


def build_hf(config: dict, device, dtype: torch.dtype, attn: str = "sdpa"):
    """transformers' AF3 at `config`, random init directly on `device` in `dtype`."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    cfg = AudioFlamingo3Config(audio_config=dict(config["audio_config"]), text_config=dict(config["text_config"]),
                               audio_token_id=config["audio_token_id"],
                               projector_hidden_act=config["projector_hidden_act"],
                               projector_bias=config["projector_bias"])
    cfg._attn_implementation = attn
    with torch.device(device), _default_dtype(dtype):
        model = AudioFlamingo3ForConditionalGeneration(cfg)
    model = model.to(device).eval()
    text = config["text_config"]
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = text["eos_token_id"], text["pad_token_id"]
    gen.bos_token_id = text["bos_token_id"]
    return model


def modules_from_hf(hf, spec: ModelSpec):
    """af3trt's AudioEncoder and Qwen2Decoder reading the tensors of `hf` (no copy)."""
    enc_state, dec_state = {}, {}
    for key, tensor in hf.state_dict().items():
        name = hub_name(key)
        if name.startswith(ENCODER_PREFIX):
            enc_state[name[len(ENCODER_PREFIX):]] = tensor
        elif name.startswith(PROJECTOR_PREFIX):
            enc_state["projector." + name[len(PROJECTOR_PREFIX):]] = tensor
        elif name.startswith(LM_PREFIX):
            dec_state[name[len(LM_PREFIX):]] = tensor
    with torch.device("meta"):
        enc = AudioEncoder(spec.audio, spec.text.hidden_size, spec.projector_bias)
        dec = Qwen2Decoder(spec.text)
    enc.load_state_dict(enc_state, strict=True, assign=True)
    dec.load_state_dict(dec_state, strict=True, assign=True)
    device = hf.lm_head.weight.device
    _fill_meta_buffers(enc, lambda: AudioEncoder(dataclasses.replace(spec.audio, num_layers=0), 1), device)
    _fill_meta_buffers(dec, lambda: Qwen2Decoder(dataclasses.replace(spec.text, num_layers=0, vocab_size=1)), device)
    meta = [n for m in (enc, dec) for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
    assert not meta, f"tensors left on the meta device: {meta[:5]}"
    return enc.eval(), dec.eval()


def _fill_meta_buffers(module, twin, device) -> None:
    """Non-persistent buffers (not in any state dict, e.g. RoPE frequencies) are still on the meta
    device after `load_state_dict(assign=True)`: take them from a small layer-less twin."""
    meta = [name for name, b in module.named_buffers() if b.is_meta]
    if not meta:
        return
    source = dict(twin().named_buffers())
    for name in meta:
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._buffers[leaf] = source[name].to(device)


def modules_on_device(spec: ModelSpec, device, dtype: torch.dtype):
    """af3trt's AudioEncoder and Qwen2Decoder with PyTorch's default random init, built on `device`."""
    with torch.device(device), _default_dtype(dtype):
        enc = AudioEncoder(spec.audio, spec.text.hidden_size, spec.projector_bias)
        dec = Qwen2Decoder(spec.text)
    return enc.eval(), dec.eval()


def weight_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of the random model's weights in `dtype`: encoder, projector and LM (embedding + lm_head)."""
    a, hidden = spec.audio, spec.text.hidden_size
    encoder = a.num_layers * (4 * a.hidden_size * a.hidden_size + 2 * a.hidden_size * a.intermediate_size)
    projector = a.hidden_size * hidden + hidden * hidden
    return (encoder + projector + lm_params(spec.text)["total"]) * torch.empty((), dtype=dtype).element_size()


def available_bytes(device) -> int | None:
    """Free memory of `device`: CUDA's free bytes, or the host's MemAvailable; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(spec: ModelSpec, device, dtype: torch.dtype, scale: float) -> None:
    """Refuse, with the figures, a random model that cannot fit (instead of allocating until the OOM
    killer ends the process). One copy of the weights: transformers' and af3trt's modules share it."""
    need = int(weight_bytes(spec, dtype) * 1.1)  # + 10 % for activations, KV cache, allocator
    free = available_bytes(device)
    if free is not None and need > free:
        raise OptionError(f"expected the random-weights model (scale {scale}, {dtype}) to fit on {device}: it needs "
                          f"~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB are available; pass --scale < 1, another "
                          f"--dtype, or run on a device with more memory")


def build(scale: float = 1.0, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
          with_hf: bool = True, seed: int = 0, tokenizer_dir: str | Path | None = None,
          cache_bytes: int = 0) -> RandomModels:
    """Random AF3 at `scale` on `device`: af3trt Pipeline (+ transformers model and processor if with_hf).

    cache_bytes: the Pipeline's encoder-output cache (0, the default, encodes every call: benchmarks).
    """
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else make_tiny_checkpoint(default_tiny_dir())
    ids = _tokenizer_ids(tok_dir)
    config = random_config(scale, audio_token_id=ids["audio_token_id"], eos_token_id=ids["eos_ids"][0],
                           pad_token_id=ids["pad_token_id"], min_vocab=ids["min_vocab"])
    spec = ModelSpec.from_config(config)
    reason = hf_available() if with_hf else "not requested"
    check_fits(spec, device, dtype, scale)
    torch.manual_seed(seed)
    hf = processor = None
    if reason is None:
        from transformers import AutoProcessor

        try:
            hf = build_hf(config, device, dtype)
            processor = AutoProcessor.from_pretrained(str(tok_dir))
        except Exception as exc:  # recorded in `weights`; the torch backend still runs
            hf = processor = None
            reason = f"transformers model build failed: {type(exc).__name__}: {exc}"
    if hf is not None:
        enc, dec = modules_from_hf(hf, spec)
        weights = "shared: hf and torch read the same random tensors (transformers init)"
    else:
        enc, dec = modules_on_device(spec, device, dtype)
        weights = f"random (PyTorch default init) for torch only; hf: {reason}"
    builder = PromptBuilder.from_pretrained(tok_dir, spec.audio_token_id, spec.text.vocab_size)
    defaults = GenerationDefaults(eos_token_ids=tuple(ids["eos_ids"]), pad_token_id=ids["pad_token_id"])
    pipeline = Pipeline(builder, TorchEncoder(enc, device), TorchDecoder(dec, device), spec, defaults, device,
                        cache_bytes=cache_bytes)
    return RandomModels(config, spec, pipeline, hf, processor, weights, tok_dir)
