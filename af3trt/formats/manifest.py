"""Engine-directory manifest and atomic stage writes (DESIGN §3).

ENGINE_DIR/manifest.json records what was built, from what (checkpoint fingerprint), with which
versions, flags and limits, and one entry per stage. A stage is written into a temporary folder
beside its final place and renamed into place when complete, so an interrupted build never
leaves a half-written stage; a stage whose key (inputs + flags) is unchanged is skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

from .. import fileio
from ..errors import OptionError, UserError
from ..records import RecordMapping
from .limits import Limits

FORMAT = "af3trt-engine-dir"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGE_NAMES = ("tokenizer", "encoder_onnx", "encoder_plan", "llm_checkpoint", "llm_engine")  # build order


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


@dataclass(frozen=True, eq=False)
class StageRecord(RecordMapping):
    """manifest.json `stages[name]`: the stage's key and checkpoint fingerprint, its `path` (relative
    to the engine dir), and either `outputs` ({file: {"size", "sha256"}}, once built) or `missing`
    (why it was not built here), `needs` (the tool), `command` (the `af3trt build` line that finishes
    it) and `manual` (the stage's own command). `facts`: what the stage reported (dtype, vocab_size,
    profile, argv, ...). A read-only Mapping over the JSON record: `entry["path"]`, `entry.get(...)`."""

    key: str | None = None
    checkpoint: str | None = None
    path: str | None = None
    outputs: dict | None = None
    missing: str | None = None
    needs: str | None = None
    command: str | None = None
    manual: str | None = None
    facts: Mapping = field(default_factory=dict)

    @property
    def built(self) -> bool:
        return self.missing is None

    @classmethod
    def read(cls, data: Mapping) -> "StageRecord":
        """From the JSON record: known keys become fields, the rest `facts`."""
        if isinstance(data, StageRecord):
            return data
        if not isinstance(data, Mapping):
            raise ManifestError(f"expected a stage record (a JSON object), got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"facts"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   facts=MappingProxyType({k: v for k, v in data.items() if k not in known}))

    def record(self) -> dict:
        """The JSON record: the fields that are set, and the facts."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "facts"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.facts}

    _items = record

    def __repr__(self) -> str:
        return f"StageRecord({self.record()!r})"


@dataclass
class Manifest:
    """manifest.json content. `stages[name]` is a `StageRecord`, in build order."""

    checkpoint: dict
    model: dict
    limits: Limits  # the JSON record read into the one Limits record
    precision: dict
    versions: dict = field(default_factory=package_versions)
    stages: dict = field(default_factory=dict)
    variant: dict = field(default_factory=lambda: {"name": "base"})  # af3trt.think.variant_record
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.stages = {name: StageRecord.read(entry) for name, entry in self.stages.items()}
        try:
            self.limits = Limits.read(self.limits)
        except OptionError as exc:
            raise ManifestError(f"manifest limits: {exc}: rebuild the engine dir with af3trt build") from exc

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
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["stages"] = {name: entry.record() for name, entry in self.stages.items()}
        data["limits"] = self.limits.record()
        fileio.atomic_write(Path(engine_dir) / MANIFEST, json.dumps(data, indent=2, sort_keys=True))

    def stage(self, name: str) -> StageRecord | None:
        """The stage's record when it was built, else None."""
        entry = self.stages.get(name)
        return entry if entry is not None and entry.built else None

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
            if not entry.built:
                raise ManifestError(f"stage {name!r} of {engine_dir} was not built: {entry.missing}. "
                                    f"Finish it with: {entry.command or '?'}")
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


