"""Open an AF3 checkpoint directory (HF layout, safetensors only) and split it into its parts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingInputError
from .fileio import file_digest
from .spec import ModelSpec

ENCODER_PREFIX = "audio_tower."
PROJECTOR_PREFIX = "multi_modal_projector."
LM_PREFIX = "language_model."  # hub layout: language_model.model.* and language_model.lm_head.weight
# layout of AudioFlamingo3ForConditionalGeneration.state_dict() (in-memory names) -> hub names
_RUNTIME_PREFIXES = {
    "model.audio_tower.": ENCODER_PREFIX,
    "model.multi_modal_projector.": PROJECTOR_PREFIX,
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
}


@dataclass
class Checkpoint:
    path: Path
    config: dict
    spec: ModelSpec

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if not path.is_dir():
            raise MissingInputError(f"expected an AF3 checkpoint directory, got {path} (not a directory)")
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
        if config is None:
            raise MissingInputError(f"expected config.json in the AF3 checkpoint {path}, found none")
        if not weight_files_in(path):
            bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {bins}: pickle files are not loaded; convert them to safetensors)" if bins else ""
            raise MissingInputError(f"expected *.safetensors weights in {path}, found none{hint}")
        return cls(path, config, ModelSpec.from_config(config))

    def weight_files(self) -> list[Path]:
        return weight_files_in(self.path)

    def load(self, prefix: str, dtype=None) -> dict:
        """Tensors whose hub name starts with `prefix`, with the prefix removed (torch, CPU)."""
        from safetensors import safe_open

        out = {}
        for file in self.weight_files():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = hub_name(key)
                    if name.startswith(prefix):
                        t = f.get_tensor(key)
                        out[name[len(prefix):]] = t.to(dtype) if dtype is not None else t
        if not out:
            raise KeyError(f"expected weights named {prefix}* in {self.path}, found none")
        return out

    def input_files(self) -> list[Path]:
        """Every file a build stage may read: all regular files under the checkpoint dir, recursively
        (config.json, weights, tokenizer, chat template, processor configs, a think/ adapter), through
        the symlinks of an HF snapshot; hidden names (.git, .cache) are left out."""
        out = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            out.append(p)
        return out

    def fingerprint(self) -> str:
        """Content hash of every input file (`input_files`: names, sizes, full sha256 each), for
        manifests. File hashes are cached by (size, mtime, inode), see `fileio.file_digest`."""
        h = hashlib.sha256()
        for file in self.input_files():
            h.update(f"{file.relative_to(self.path).as_posix()}:{file.stat().st_size}:{file_digest(file)}\n".encode())
        return h.hexdigest()[:16]


def weight_files_in(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def hub_name(key: str) -> str:
    """Map in-memory HF names (`model.audio_tower...`) to hub names (`audio_tower...`); hub names pass."""
    for src, dst in _RUNTIME_PREFIXES.items():
        if key.startswith(src):
            return dst + key[len(src):]
    return key
