"""AF3-Think: the `think/` folder of an AF3 checkpoint, applied to the base weights.

`nvidia/audio-flamingo-3-hf` ships the on-demand chain-of-thought mode as CKPT/think/:
`adapter_config.json` + `adapter_model.safetensors` (a PEFT LoRA on the model) and
`non_lora_trainables.bin` (a torch-saved state dict). The reference loads it as

    model.load_state_dict(torch.load("CKPT/think/non_lora_trainables.bin"), strict=False)
    model = PeftModel.from_pretrained(model, "CKPT", subfolder="think")

and ends the user turn with `THINK_SUFFIX`. `open_checkpoint(CKPT, "think")` gives a `Checkpoint`
whose `load(prefix)` returns the think weights: the non-LoRA tensors replace base weights by name
(transformers' in-memory names `model.audio_tower.*`, `model.language_model.*`, `lm_head.*`, or the
hub names, one mapping table: `checkpoint.hub_name`), then each LoRA pair is merged with PEFT's
semantics, W + (lora_alpha / r) * B @ A. Every consumer of a `Checkpoint` (torch encoder, ONNX
export, TensorRT-LLM checkpoint export, calibration) thereby builds the think model; its
`fingerprint()` covers the think files, so every stage key depends on them.

Safety: non_lora_trainables.bin is read with `torch.load(weights_only=True)` only, and must hold a
flat dict str -> tensor; anything else is refused with an error naming it. Adapter features this
merge does not implement (DoRA, rsLoRA, fan_in_fan_out, per-module ranks, modules_to_save, ...)
are refused with an error naming the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import ENCODER_PREFIX, PROJECTOR_PREFIX, Checkpoint, hub_name
from .errors import OptionError, UserError

log = logging.getLogger(__name__)

VARIANTS = ("base", "think")
THINK_DIR = "think"
THINK_SUFFIX = "Please think and reason about the input audio before you respond."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora_trainables.bin"
THINK_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA_FILE)
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped transformers model
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"

# adapter_config.json fields this merge handles whatever their value (training-time or init-time
# settings that do not change the trained adapter's forward pass)
_ANY_VALUE = {"base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "lora_dropout",
              "peft_version", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
              "lora_ga_config", "ensure_weight_tying", "runtime_config", "layers_pattern", "exclude_modules",
              "target_modules", "r", "lora_alpha", "peft_type", "bias", "init_lora_weights"}
# what PEFT does with a set value of these fields, for the refusal message
_NOT_IMPLEMENTED = {"use_dora": "DoRA", "use_rslora": "rsLoRA (scaling lora_alpha / sqrt(r))",
                    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)", "lora_bias": "a LoRA bias",
                    "use_qalora": "QALoRA", "rank_pattern": "per-module ranks (rank_pattern)",
                    "alpha_pattern": "per-module alphas (alpha_pattern)", "modules_to_save": "modules_to_save",
                    "layers_to_transform": "layers_to_transform", "layer_replication": "layer_replication",
                    "trainable_token_indices": "trainable tokens", "target_parameters": "LoRA on parameters",
                    "alora_invocation_tokens": "activated LoRA (aLoRA)", "megatron_config": "Megatron LoRA layers"}
# inits that leave the base weights and the LoRA of a targeted module without saved weights at zero
# effect (B = 0); False (random A and B there) and pissa, olora, loftq, corda, ... (base weights rewritten) do not
_INIT_KEEPS_BASE = (True, "gaussian")


class ThinkError(UserError):
    """A think/ folder that cannot be applied: missing files, unsafe or malformed content, unsupported adapter."""


def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise OptionError(f"expected variant in {VARIANTS}, got {name!r}")
    return name


def _off(value) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ()


def load_non_lora(path: str | Path) -> dict:
    """`non_lora_trainables.bin` -> {name: tensor}. Read with `torch.load(weights_only=True)` (no code
    runs: a pickle naming anything but tensors and plain containers is refused by torch), then the
    content must be a flat dict of str -> tensor; anything else (lists, nested dicts, numbers, ...) is
    refused with an error naming it."""
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever torch rejects (unsafe globals, not a torch file) refuses the file
        raise ThinkError(f"refused {path}: expected a torch-saved flat dict of str -> tensor that loads with "
                         f"torch.load(weights_only=True), got content it rejects: {exc}") from exc
    if not isinstance(obj, dict):
        raise ThinkError(f"refused {path}: expected a flat dict of str -> tensor, got {type(obj).__name__}")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ThinkError(f"refused {path}: expected a flat dict of str -> tensor, got {len(bad)} entries of other "
                         f"types, e.g. {', '.join(bad[:5])}")
    return {k: v.detach() for k, v in obj.items()}


def _base_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in ckpt.weight_files():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                shapes[hub_name(key)] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_adapter_config(config: dict, where: Path) -> float:
    """Refuse what the merge does not implement; returns PEFT's scaling lora_alpha / r."""
    if config.get("peft_type") != "LORA":
        raise ThinkError(f"{where}: expected peft_type 'LORA', got {config.get('peft_type')!r}")
    for key, value in config.items():
        if key in _NOT_IMPLEMENTED and not _off(value):
            raise ThinkError(f"{where}: {_NOT_IMPLEMENTED[key]} is not implemented: expected {key} unset, got {value!r}")
        if key not in _ANY_VALUE and key not in _NOT_IMPLEMENTED and not _off(value):
            raise ThinkError(f"{where}: unknown adapter setting {key}={value!r}: expected it unset (this merge "
                             f"implements plain LoRA only)")
    if config.get("bias", "none") != "none":
        raise ThinkError(f"{where}: expected bias 'none' (no trained biases), got {config.get('bias')!r}")
    if config.get("init_lora_weights", True) not in _INIT_KEEPS_BASE:
        raise ThinkError(f"{where}: expected init_lora_weights in {_INIT_KEEPS_BASE} (inits that change nothing "
                         f"but the saved LoRA pairs when PEFT loads the adapter), got {config.get('init_lora_weights')!r}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or isinstance(r, bool) or not isinstance(alpha, (int, float)):
        raise ThinkError(f"{where}: expected an int r >= 1 and a number lora_alpha, got r={r!r}, lora_alpha={alpha!r}")
    return alpha / r


def _matches(spec, module: str) -> bool:
    """PEFT's target_modules / exclude_modules test: a str is a full regex match (or "all-linear"), a list
    matches a module of that name or ending in "." + that name."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return module.rsplit(".", 1)[-1] != "lm_head" if spec == "all-linear" else re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith("." + t) for t in spec)


def read_lora(folder: Path, config: dict, shapes: dict) -> dict:
    """adapter_model.safetensors -> {hub weight name: (A (r, in), B (out, r))}, each pair checked against
    the adapter config (target_modules, r) and the base weight's shape."""
    from safetensors import safe_open

    where = folder / ADAPTER_WEIGHTS
    r = config["r"]
    with safe_open(str(where), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    other = sorted(k for k in tensors if not (k.endswith(_LORA_A) or k.endswith(_LORA_B)))
    if other:
        raise ThinkError(f"{where}: expected only LoRA pairs (*{_LORA_A}, *{_LORA_B}; LoRA on embeddings or "
                         f"convolutions, trained biases and saved modules are not implemented), got {len(other)} "
                         f"other tensors, e.g. {other[:5]}")
    pairs = {}
    for key_a in sorted(k for k in tensors if k.endswith(_LORA_A)):
        module = key_a[: -len(_LORA_A)]
        key_b = module + _LORA_B
        if key_b not in tensors:
            raise ThinkError(f"{where}: expected {key_b} beside {key_a}, found none")
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
        if not _matches(config.get("target_modules"), module) or _matches(config.get("exclude_modules"), module):
            raise ThinkError(f"{where}: LoRA weights for {module}, which target_modules "
                             f"{config.get('target_modules')!r} does not select (PEFT would not load them)")
        name = hub_name(module + ".weight")
        a, b = tensors[key_a], tensors[key_b]
        base = shapes.get(name)
        if base is None:
            raise ThinkError(f"{where}: LoRA weights for {module}: expected a base weight {name} in the checkpoint, "
                             f"found none")
        if a.dim() != 2 or b.dim() != 2 or len(base) != 2 or a.shape[0] != r or b.shape[1] != r \
                or (b.shape[0], a.shape[1]) != base:
            raise ThinkError(f"{where}: {module}: expected lora_A ({r}, {base[1] if len(base) == 2 else '?'}) and "
                             f"lora_B ({base[0]}, {r}) for the base weight {tuple(base)}, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        pairs[name] = (a, b)
    unpaired = sorted(k for k in tensors if k.endswith(_LORA_B) and k[: -len(_LORA_B)] + _LORA_A not in tensors)
    if unpaired:
        raise ThinkError(f"{where}: expected a lora_A beside each lora_B, got {len(unpaired)} alone: {unpaired[:5]}")
    if not pairs:
        raise ThinkError(f"{where}: expected LoRA weights, found none")
    return pairs


def files_digest(folder: Path) -> str:
    """Content hash of the think files (every byte of each)."""
    h = hashlib.sha256()
    for name in THINK_FILES:
        h.update(f"{name}\0".encode())
        with open(folder / name, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ThinkWeights:
    """The parsed think/ folder. overrides: non-LoRA tensors by hub name; lora: (A, B) by the hub name
    of the weight they adapt; unmatched: non-LoRA names that name no weight of the checkpoint in either
    naming (reported, not applied); digest: hash of the three files."""

    folder: Path
    config: dict
    scaling: float
    overrides: dict
    lora: dict
    unmatched: tuple[str, ...]
    digest: str

    @classmethod
    def read(cls, ckpt: Checkpoint) -> "ThinkWeights":
        folder = ckpt.path / THINK_DIR
        missing = [n for n in THINK_FILES if not (folder / n).is_file()]
        if missing:
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no think/ folder"
            raise ThinkError(f"expected {', '.join(THINK_FILES)} in {folder} for variant 'think', missing "
                             f"{missing} (found {found})")
        try:
            config = json.loads((folder / ADAPTER_CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise ThinkError(f"{folder / ADAPTER_CONFIG}: expected JSON, got {exc}") from exc
        if not isinstance(config, dict):
            raise ThinkError(f"{folder / ADAPTER_CONFIG}: expected a JSON object, got {type(config).__name__}")
        scaling = check_adapter_config(config, folder / ADAPTER_CONFIG)
        shapes = _base_shapes(ckpt)
        lora = read_lora(folder, config, shapes)
        overrides, unmatched = {}, []
        for key, tensor in load_non_lora(folder / NON_LORA_FILE).items():
            name = hub_name(key)
            if name not in shapes:
                unmatched.append(key)
                continue
            if tuple(tensor.shape) != shapes[name]:
                raise ThinkError(f"{folder / NON_LORA_FILE}: {key}: expected shape {shapes[name]} (the checkpoint's "
                                 f"{name}), got {tuple(tensor.shape)}")
            if name in overrides:
                raise ThinkError(f"{folder / NON_LORA_FILE}: expected one tensor per weight, got two for {name}")
            overrides[name] = tensor
        if unmatched:
            log.warning("%s: %d keys name no weight of %s (neither transformers' in-memory names nor hub names), "
                        "not applied: %s", folder / NON_LORA_FILE, len(unmatched), ckpt.path, unmatched[:10])
        return cls(folder, config, scaling, overrides, lora, tuple(unmatched), files_digest(folder))

    def touches(self, *prefixes: str) -> bool:
        return any(n.startswith(prefixes) for n in (*self.overrides, *self.lora))

    def apply(self, prefix: str, state: dict) -> dict:
        """Base tensors named relative to `prefix` -> think tensors (non-LoRA first, then W + s * B @ A)."""
        import torch

        for name, tensor in self.overrides.items():
            if name.startswith(prefix):
                rel = name[len(prefix):]
                state[rel] = tensor.to(state[rel].dtype)
        for name, (a, b) in self.lora.items():
            if name.startswith(prefix):
                rel = name[len(prefix):]
                w = state[rel]
                state[rel] = torch.addmm(w.float(), b.float(), a.float(), alpha=self.scaling).to(w.dtype)
        return state

    def record(self) -> dict:
        """The manifest's `variant` entry."""
        return {"name": "think", "adapter": self.digest, "suffix": THINK_SUFFIX, "scaling": self.scaling,
                "r": self.config["r"], "lora_alpha": self.config["lora_alpha"], "lora_modules": len(self.lora),
                "non_lora": {"applied": len(self.overrides), "unmatched": len(self.unmatched),
                             "unmatched_names": list(self.unmatched[:20]),
                             "encoder": self.touches(ENCODER_PREFIX, PROJECTOR_PREFIX)}}


@dataclass
class ThinkCheckpoint(Checkpoint):
    """A `Checkpoint` whose weights are the think variant's (see the module docstring)."""

    think: ThinkWeights = field(default=None, repr=False)
    variant = "think"

    def load(self, prefix: str, dtype=None) -> dict:
        state = self.think.apply(prefix, super().load(prefix))
        return {k: v.to(dtype) for k, v in state.items()} if dtype is not None else state

    def fingerprint(self) -> str:
        base = super().fingerprint()
        return hashlib.sha256(f"{base}:think:{self.think.digest}".encode()).hexdigest()[:16]


def open_checkpoint(path: str | Path, variant: str = "base") -> Checkpoint:
    """`Checkpoint.open(path)` for variant "base"; the think weights of path/think/ for "think"."""
    ckpt = Checkpoint.open(path)
    if check_variant(variant) == "base":
        return ckpt
    return ThinkCheckpoint(ckpt.path, ckpt.config, ckpt.spec, think=ThinkWeights.read(ckpt))


def variant_record(ckpt: Checkpoint) -> dict:
    """The manifest's `variant` entry for a checkpoint from `open_checkpoint`."""
    think = getattr(ckpt, "think", None)
    return think.record() if think is not None else {"name": "base"}
