"""af3trt's imports go one way (docs/architecture.md): core < kernels < runtime < build < serving < benchmark < cli.

An ast walk of every module under af3trt/ (Triton templates included), module-level and function-level imports
alike; no module is imported, so the test runs in well under a second and needs no optional package.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "af3trt"

CORE = {"af3trt", "af3trt.spec", "af3trt.audio", "af3trt.features", "af3trt.prompt", "af3trt.checkpoint",
        "af3trt.errors", "af3trt.fileio", "af3trt.stats", "af3trt.think", "af3trt.tiny", "af3trt.dtypes",
        "af3trt.assets", "af3trt.records"}
LAYERS = ("core", "kernels", "runtime", "build", "serving", "benchmark", "cli")
# Triton python models run inside tritonserver: thin adapters over runtime; they may read the repository's
# typed specs (build.triton_spec) and nothing else of build, nor serving/benchmark/cli.
ADAPTER_EXTRA = {"af3trt.build.triton_spec"}
# Modules that are torch-free when imported (today's set, measured; `import af3trt` and `af3trt --help` among them).
TORCH_FREE = {
    "af3trt", "af3trt.cli", "af3trt.errors", "af3trt.fileio", "af3trt.stats", "af3trt.spec", "af3trt.audio",
    "af3trt.features", "af3trt.prompt", "af3trt.checkpoint", "af3trt.think", "af3trt.tiny",
    "af3trt.dtypes", "af3trt.assets", "af3trt.records", "af3trt.kernels", "af3trt.build", "af3trt.serving",
    "af3trt.build.calibration", "af3trt.build.engine_dir", "af3trt.build.engine_rules", "af3trt.build.llm",
    "af3trt.build.precision", "af3trt.build.stage_log", "af3trt.build.stages", "af3trt.build.triton",
    "af3trt.build.triton_spec", "af3trt.build.trtllm_flags",
    "af3trt.serving.client", "af3trt.serving.launch", "af3trt.serving.openai_schema",
    "af3trt.serving.openai_server", "af3trt.serving.server",
}
TORCH_FREE_PREFIXES = ("af3trt.formats", "af3trt.build.templates")
# never at module level anywhere (optional for the caller); torch/transformers/safetensors/tokenizers: never at
# module level in TORCH_FREE modules
OPTIONAL = {"tensorrt", "tensorrt_llm", "modelopt", "onnx", "onnxruntime", "tritonclient", "fastapi", "uvicorn",
            "matplotlib", "pytriton", "triton", "transformers"}
TORCH_LIKE = {"torch", "transformers", "safetensors", "tokenizers", "onnx", "onnxruntime"}
# cli.py dispatches: one lazy import per `_cmd_*` keeps `af3trt --help` light; nothing else may import lazily
LAZY_OK = {"af3trt.cli", "af3trt.benchmark.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}


def owner(name: str) -> str | None:
    """The af3trt module an imported dotted name lands in (a submodule or an attribute of a package)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def imports(mod: str, path: Path):
    """(target, lazy, function, lineno) for every import in `mod`; target: an af3trt module or a top-level package."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node, qual, lazy):
        func = qual if lazy else ""
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, func, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                if base.split(".")[0] == "af3trt":
                    out.extend((f"{base}.{a.name}", func, child.lineno) for a in child.names)
                else:
                    out.append((base, func, child.lineno))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                # a class body runs at import time: only a function makes an import lazy
                visit(child, f"{qual}.{child.name}" if qual else child.name,
                      lazy or not isinstance(child, ast.ClassDef))
            else:
                visit(child, qual, lazy)

    visit(tree, "", False)
    rows = []
    for name, func, line in out:
        target = owner(name) if name.split(".")[0] == "af3trt" else name.split(".")[0]
        if target and target != mod:
            rows.append((target, bool(func), func, line))
    return rows


GRAPH = {m: imports(m, p) for m, p in MODULES.items()}


def layer(mod: str) -> str:
    if mod in CORE or mod == "af3trt.testing" or mod.startswith("af3trt.formats"):
        return "core"
    if mod == "af3trt.cli":
        return "cli"
    if mod.startswith("af3trt.build.templates"):
        return "adapter"
    return mod.split(".")[1]


def allowed(src: str, dst: str) -> bool:
    if dst == "af3trt.testing":
        return False
    ls, ld = layer(src), layer(dst)
    if ls == "adapter":
        return ld in ("core", "kernels", "runtime") or dst in ADAPTER_EXTRA
    if ld == "adapter" or ls == "testing":
        return False
    return LAYERS.index(ld) <= LAYERS.index(ls)


def test_imports_only_go_down():
    bad = sorted({f"{s}:{f or '<module>'}:{n} -> {d} ({layer(s)} -> {layer(d)})"
                 for s, rows in GRAPH.items() for d, _, f, n in rows
                 if d.startswith("af3trt") and not allowed(s, d)})
    print("\n".join(bad))
    assert not bad


def test_own_imports_are_module_level():
    """An af3trt import sits in a function only where a torch-free module needs a torch one (or in cli dispatch)."""
    lazy = sorted({f"{s}:{f}:{n} -> {d}" for s, rows in GRAPH.items() for d, is_lazy, f, n in rows
                   if is_lazy and d.startswith("af3trt") and s not in LAZY_OK
                   and not (torch_free(s) and eager(d) & (TORCH_LIKE | OPTIONAL))})
    print("\n".join(lazy))
    assert not lazy


def torch_free(mod: str) -> bool:
    return mod in TORCH_FREE or mod.startswith(TORCH_FREE_PREFIXES)


def eager(mod: str) -> set[str]:
    """Every module and top-level package that importing `mod` imports (parents' __init__ included)."""
    seen, todo = set(), [mod]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]
        todo += [d for d, is_lazy, _, _ in GRAPH.get(m, ()) if not is_lazy]
    return seen


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if torch_free(m)))
def test_torch_free_modules_stay_torch_free(mod):
    heavy = sorted(eager(mod) & (TORCH_LIKE | OPTIONAL))
    assert not heavy, f"importing {mod} imports {heavy}: import them inside the function that needs them"


def test_optional_packages_are_lazy():
    bad = sorted(f"{s}:{n} imports {d} at module level" for s, rows in GRAPH.items()
                 for d, is_lazy, _, n in rows if d in OPTIONAL and not is_lazy)
    assert not bad, bad


def test_no_import_circles():
    graph = defaultdict(set)
    for s, rows in GRAPH.items():
        for d, _, _, _ in rows:
            if d.startswith("af3trt") and d in MODULES:
                graph[s].add(d)
    index, low, stack, on, circles = {}, {}, [], set(), []
    sys.setrecursionlimit(10_000)

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own submodule is not a circle
            top = min(comp, key=len)
            if len(comp) > 1 and not all(c == top or c.startswith(top + ".") for c in comp):
                circles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            strong(v)
    assert not circles, circles
