"""Engine-directory manifest and atomic stage writes (DESIGN §3).

ENGINE_DIR/manifest.json records what was built, from what (checkpoint fingerprint), with which
versions, flags and limits, and one entry per stage. A stage is written into a temporary folder
beside its final place and renamed into place when complete, so an interrupted build never
leaves a half-written stage; a stage whose key (inputs + flags) is unchanged is skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import fileio
from ..errors import UserError

FORMAT = "af3trt-engine-dir"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGES = ("tokenizer", "encoder_onnx", "encoder_plan", "llm_checkpoint", "llm_engine")


class ManifestError(UserError):
    """An engine dir that cannot be used: missing, other format/version, other checkpoint, missing stage."""


def stage_key(**inputs) -> str:
    """Stable hash of a stage's inputs and flags (JSON-serializable values)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in ("af3trt", "torch", "transformers", "nvidia-modelopt", "onnx", "onnxruntime", "tensorrt",
                 "tensorrt_llm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Manifest:
    """manifest.json content. `stages[name]` holds `key`, `path`, and stage facts, or `missing`
    (why it was not built) and `command` (how to finish it elsewhere)."""

    checkpoint: dict
    model: dict
    limits: dict
    precision: dict
    versions: dict = field(default_factory=package_versions)
    stages: dict = field(default_factory=dict)
    variant: dict = field(default_factory=lambda: {"name": "base"})  # af3trt.think.variant_record
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def read(cls, engine_dir: str | Path) -> "Manifest":
        path = Path(engine_dir) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"expected an af3trt engine dir with {MANIFEST} at {engine_dir}, found none")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"expected {path} to hold JSON, got unreadable text ({exc}): rebuild the engine "
                                f"dir with af3trt build") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"expected a JSON object in {path}, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ManifestError(f"expected manifest format {FORMAT!r}, got {data.get('format')!r} in {path}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"expected manifest format_version {FORMAT_VERSION} (this af3trt), got {data.get('format_version')} "
                f"in {path}: rebuild the engine dir with this af3trt"
            )
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ManifestError(f"unknown keys {sorted(unknown)} in {path}; expected only {sorted(known)}")
        return cls(**data)

    def write(self, engine_dir: str | Path) -> None:
        fileio.atomic_write_text(Path(engine_dir) / MANIFEST, json.dumps(asdict(self), indent=2, sort_keys=True))

    def stage(self, name: str) -> dict | None:
        entry = self.stages.get(name)
        return entry if entry and "missing" not in entry else None

    def engine_vocab_size(self) -> int:
        """vocab_size of the TensorRT-LLM checkpoint / engine (`stages.llm_checkpoint.vocab_size`): where
        fake ids start. The model's own `model.vocab_size` or, for int4_awq, ModelOpt's padded one
        (`af3trt.build.precision.engine_vocab_size`); ids at or above `model.vocab_size` are never
        generated."""
        entry = self.stage("llm_checkpoint")
        if entry is None or entry.get("vocab_size") is None:
            raise ManifestError("expected stage llm_checkpoint with its vocab_size in the manifest, found none: "
                                "build the llm stage (af3trt build --stages llm)")
        return int(entry["vocab_size"])

    def require(self, engine_dir: str | Path, *names: str) -> None:
        """Raise unless every named stage was built and its folder is present."""
        for name in names:
            entry = self.stages.get(name)
            if entry is None:
                raise ManifestError(f"expected stage {name!r} in {engine_dir}, the build did not run it")
            if "missing" in entry:
                raise ManifestError(f"stage {name!r} of {engine_dir} was not built: {entry['missing']}. "
                                    f"Finish it with: {entry.get('command', '?')}")
            if not (Path(engine_dir) / entry["path"]).exists():
                raise ManifestError(f"stage {name!r} lists {entry['path']} but {engine_dir} has no such path")
            problems = output_problems(engine_dir, entry, hashes=False)  # sizes: cheap at every load
            if problems:
                raise ManifestError(f"stage {name!r} of {engine_dir} is not what was built: {'; '.join(problems[:4])}. "
                                    f"Rebuild it with the same `af3trt build` (changed stages are redone)")


def output_record(engine_dir: str | Path, paths) -> dict[str, dict]:
    """{relative file: {"size", "sha256"}} of a stage's outputs: each of `paths` (relative to the
    engine dir) is a file or a folder (every file under it)."""
    root = Path(engine_dir)
    record = {}
    for rel in paths:
        p = root / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            record[f.relative_to(root).as_posix()] = {"size": f.stat().st_size, "sha256": fileio.file_digest(f)}
    return record


def output_problems(engine_dir: str | Path, entry: dict, hashes: bool = True) -> list[str]:
    """What differs between a stage's recorded `outputs` and the files now: missing, other size,
    other content (`hashes`; sizes only otherwise). [] = intact; a record without outputs is intact
    only if its path exists."""
    root = Path(engine_dir)
    record = entry.get("outputs")
    if record is None:
        return [] if (root / entry["path"]).exists() else [f"{entry['path']}: missing"]
    if not record:
        return [f"{entry['path']}: no files recorded"]
    out = []
    for rel, want in record.items():
        f = root / rel
        if not f.is_file():
            out.append(f"{rel}: missing")
        elif f.stat().st_size != want["size"]:
            out.append(f"{rel}: {f.stat().st_size} bytes, recorded {want['size']}")
        elif hashes and fileio.file_digest(f) != want["sha256"]:
            out.append(f"{rel}: content changed (sha256 differs from the record)")
    return out


