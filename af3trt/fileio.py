"""File modes that honour the umask, for everything af3trt writes.

`tempfile.mkstemp` creates files 0600 and `mkdtemp` folders 0700 whatever the umask; renamed into
place, they would keep those modes, and another user (a Triton container running as non-root with
the engine dir mounted, `su nobody`) could not read them. Every temporary file or folder af3trt
renames into place goes through `like_umask` first: files get 0666 & ~umask, folders 0777 & ~umask,
exactly what `open()` / `os.mkdir()` would have given them.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

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
