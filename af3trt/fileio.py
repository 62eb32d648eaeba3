"""File modes that honour the umask, for everything af3trt writes.

`tempfile.mkstemp` creates files 0600 and `mkdtemp` folders 0700 whatever the umask; renamed into
place, they would keep those modes, and another user (a Triton container running as non-root with
the engine dir mounted, `su nobody`) could not read them. Every temporary file or folder af3trt
renames into place goes through `like_umask` first: files get 0666 & ~umask, folders 0777 & ~umask,
exactly what `open()` / `os.mkdir()` would have given them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .errors import OutputError

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _LOCK:  # elsewhere: set and restore (not atomic for other threads creating files meanwhile)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def like_umask(path: str | os.PathLike, executable: bool = False) -> str | os.PathLike:
    """chmod `path` (file or folder) to what a plain create would give it; returns `path`.

    executable: a file meant to be run (scripts): 0777 & ~umask, like a folder."""
    full = 0o777 if executable or os.path.isdir(path) else 0o666
    os.chmod(path, full & ~current_umask())
    return path


def mkdtemp(**kw) -> str:
    """`tempfile.mkdtemp` whose folder has the umask's mode (it is renamed into place later)."""
    return like_umask(tempfile.mkdtemp(**kw))


def mkstemp(**kw) -> tuple[int, str]:
    """`tempfile.mkstemp` whose file has the umask's mode (it is renamed into place later)."""
    fd, path = tempfile.mkstemp(**kw)
    like_umask(path)
    return fd, path


def tree_like_umask(root: str | os.PathLike) -> None:
    """`like_umask` on `root` and everything under it (a staged folder before it is renamed into
    place): third-party writers create some files 0600 (safetensors' `save_file`, ModelOpt's export
    through it). Files with an executable bit stay executable."""
    root = Path(root)
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        full = 0o777 if path.is_dir() or mode & 0o111 else 0o666
        os.chmod(path, full & ~mask)


# --------------------------------------------------------------------------- content hashes

_DIGEST_CHUNK = 8 << 20  # bytes read per update: large sequential reads, bounded memory
_DIGESTS: dict[str, str] = {}
_DIGEST_LOCK = threading.Lock()


def _digest_cache_file() -> Path:
    return Path(os.environ.get("AF3TRT_CACHE", Path.home() / ".cache" / "af3trt")) / "file-digests.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of the whole file, streamed. Cached by (real path, size, mtime, inode), in this
    process and in $AF3TRT_CACHE/file-digests.json: a file changed in place gets a new mtime, so a
    fresh hash; an unchanged 15 GB checkpoint is read once, not at every build."""
    import hashlib
    import json

    path = Path(path)
    key = _stat_key(path)
    with _DIGEST_LOCK:
        if not _DIGESTS:
            try:
                _DIGESTS.update(json.loads(_digest_cache_file().read_text()))
            except (OSError, ValueError):
                pass
        if key in _DIGESTS:
            return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_DIGEST_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if _stat_key(path) != key:  # written while we read it: do not cache a torn hash
        return digest
    with _DIGEST_LOCK:
        _DIGESTS[key] = digest
        cache = _digest_cache_file()
        try:
            atomic_write(cache, json.dumps(_DIGESTS))
        except OSError:  # a read-only cache only costs re-hashing next time
            pass
    return digest


def temp_dir_beside(final: str | os.PathLike, prefix: str) -> Path:
    """mkdtemp in `final`'s parent (created if needed), for an atomic rename onto `final`; a parent that
    cannot be written is an OutputError naming `final`, never the temporary name."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(mkdtemp(prefix=prefix, dir=final.parent))  # the umask's mode (renamed into place)
    except OSError as exc:
        raise OutputError(f"expected a writable folder to create {final} in, got {final.parent}: "
                          f"{exc.strerror or exc}") from exc


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text, or bytes / any buffer: a TensorRT plan) to `path` through a temporary file
    beside it renamed into place: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w" if isinstance(data, str) else "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


atomic_write_text = atomic_write  # the earlier name


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
    tree_like_umask(tmp)  # what third-party writers made 0600 (safetensors, ONNX data)
    replace_dir(tmp, final)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the folder `tmp` in the place of `final` (a folder, or nothing): the old one is renamed aside
    (`.NAME.old`, which `clean_partials` removes if this is interrupted) and deleted after the swap."""
    tmp, final = Path(tmp), Path(final)
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
