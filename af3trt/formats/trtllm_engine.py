"""A TensorRT-LLM engine's config.json read back: the build settings runtime and the Triton writer
act on (`engine_config`, `engine_plugins`, `kv_reuse_allowed`). Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MissingInputError


def engine_config(engine_dir: str | Path) -> dict:
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise MissingInputError(f"expected a TensorRT-LLM engine config at {path}, found none")
    return json.loads(path.read_text())


def engine_plugins(engine_config: dict) -> dict:
    """The plugin settings an engine was built with, read back from its config.json."""
    plugin = (engine_config.get("build_config") or {}).get("plugin_config") or {}
    return {k: plugin.get(k) for k in ("context_fmha", "use_paged_context_fmha", "use_fp8_context_fmha",
                                       "paged_kv_cache", "tokens_per_block")}


def kv_reuse_allowed(engine_config: dict) -> bool:
    """KV-cache block reuse only on an engine built with paged context FMHA (and a paged KV cache)."""
    build = engine_config.get("build_config") or {}
    plugin = build.get("plugin_config") or {}
    paged_kv = str(build.get("kv_cache_type", "PAGED")).upper().endswith("PAGED")
    return bool(plugin.get("use_paged_context_fmha")) and paged_kv
