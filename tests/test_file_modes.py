"""Everything af3trt writes honours the umask (issue 12, finding 7): a Triton container running as
another user reads the engine dir. Temp files and folders (mkstemp 0600, mkdtemp 0700) renamed into
place used to keep their private modes."""

import os
import stat
from pathlib import Path

import pytest


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def unreadable_by_others(root: Path) -> dict[str, str]:
    bad = {}
    for name, mode in modes(root).items():
        path = root / name
        need = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        if mode & need != need:
            bad[name] = oct(mode)
    return bad


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


def test_tiny_checkpoint_engine_dir_repository_and_reports_are_readable_by_others(umask, tiny_dir, tmp_path):
    from af3trt.benchmark.report import write_json
    from af3trt.build.engine_dir import BuildOptions, build_engine_dir
    from af3trt.build.llm import EngineLimits
    from af3trt.build.triton import write_repository
    from af3trt.tiny import make_tiny_checkpoint

    umask(0o022)
    tiny = make_tiny_checkpoint(tmp_path / "tiny")
    engine = tmp_path / "engine"
    build_engine_dir(model=tiny_dir, out=engine, options=BuildOptions(
        precision="bf16", limits=EngineLimits(max_batch_size=1, max_audio_seconds=30, max_new_tokens=16)))
    repo = tmp_path / "repo"
    write_repository(engine, repo, llm_backend="python")
    report = write_json({"p50_ms": 1.0}, tmp_path / "bench" / "result.json")
    for root in (tiny, engine, repo, report.parent):
        bad = unreadable_by_others(root)
        print(root.name, len(modes(root)), "paths, not readable by others:", bad)
        assert bad == {}, f"{root}: {bad}"
    assert stat.S_IMODE((engine / "manifest.json").stat().st_mode) == 0o644
    script = engine / "llm" / "build_engine.sh"
    assert stat.S_IMODE(script.stat().st_mode) == 0o755


def test_a_private_umask_stays_private(umask, tmp_path):
    """0666/0777 & ~umask both ways: 077 gives 0600 files and 0700 folders, not a forced 0644."""
    from af3trt.fileio import atomic_write_text, staged_dir

    umask(0o077)
    atomic_write_text(tmp_path / "a.json", "{}")
    with staged_dir(tmp_path / "stage") as tmp:
        (tmp / "f").write_text("x")
    got = {k: oct(v) for k, v in modes(tmp_path).items() if k != "."}
    print(got)
    assert got == {"a.json": "0o600", "stage": "0o700", "stage/f": "0o600"}
