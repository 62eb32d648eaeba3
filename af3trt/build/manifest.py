"""Engine-directory manifest and atomic stage writes (DESIGN §3).

ENGINE_DIR/manifest.json records what was built, from what (checkpoint fingerprint), with which
versions, flags and limits, and one entry per stage. A stage is written into a temporary folder
beside its final place and renamed into place when complete, so an interrupted build never
leaves a half-written stage; a stage whose key (inputs + flags) is unchanged is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError, temp_dir_beside

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
        atomic_write_text(Path(engine_dir) / MANIFEST, json.dumps(asdict(self), indent=2, sort_keys=True))

    def stage(self, name: str) -> dict | None:
        entry = self.stages.get(name)
        return entry if entry and "missing" not in entry else None

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


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield a temporary folder beside `final`; on success replace `final` with it, else delete it."""
    final = Path(final)
    tmp = temp_dir_beside(final, f".{final.name}.partial-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def clean_partials(engine_dir: Path) -> None:
    """Remove leftovers of an interrupted build (`.NAME.partial-*`, `.NAME.tmp-*`, `.NAME.old[-*]`)."""
    for pattern in (".*.partial-*", ".*.tmp-*", ".*.old", ".*.old-*"):
        for path in Path(engine_dir).rglob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
