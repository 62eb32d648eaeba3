"""How a model repository is launched: one tritonserver, or one per rank under mpirun for TP/PP > 1.

TensorRT-LLM's executor in leader mode needs an MPI world of tp*pp ranks (`executorImpl.cpp`: "MPI
worldSize is expected to be equal to tp*pp*cp"). NVIDIA launches that as `launch_triton_server.py
--world_size N` does (tensorrtllm_backend `scripts/launch_triton_server.py`): `mpirun
--allow-run-as-root -n 1 tritonserver ... : -n 1 tritonserver ... : ...`, one rank per GPU, each
with its own python-backend shared-memory prefix (`--backend-config=python,shm-region-prefix-name=
prefix{rank}_`), `--disable-auto-complete-config`, and the ranks other than 0 loading only the
TensorRT-LLM model (`--model-control-mode=explicit --load-model=tensorrt_llm`). Here those ranks also
open no endpoint (`--allow-http/grpc/metrics=false`): only rank 0 serves clients.

Rank 0 gets `--cuda-memory-pool-byte-size=0:BYTES`: prompt tables travel between the python models
and the LLM in GPU memory (NVIDIA's multimodal guide sizes the pool for them, 300 MB in its example);
`write_repository` records the size for the largest tables (`pool_bytes`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MIN_POOL_BYTES = 300_000_000  # NVIDIA's multimodal docs (`--multimodal_gpu0_cuda_mem_pool_bytes 300000000`)
LLM_MODEL = "tensorrt_llm"


def pool_bytes(max_audio_tokens: int, hidden_size: int, table_bytes: int, max_batch_size: int) -> int:
    """CUDA memory pool of GPU 0: every in-flight request's largest prompt table, at least 300 MB
    (a 10-minute bf16 table: 15,000 x 3,584 x 2 B = 107.5 MB per request)."""
    return max(MIN_POOL_BYTES, int(max_audio_tokens) * int(hidden_size) * int(table_bytes) * int(max_batch_size))


@dataclass(frozen=True)
class LaunchSpec:
    """world_size: ranks of the LLM engine (tp*pp; 1 for the python LLM); cuda_memory_pool_bytes: GPU 0's
    pool (None: the python-LLM repositories, which also run on CPU, set none); tensorrt_llm: the version
    that built the engine (None: not recorded, not checked)."""

    world_size: int = 1
    cuda_memory_pool_bytes: int | None = None
    tensorrt_llm: str | None = None
    cpp_llm: bool = False  # the repository's LLM is the tensorrtllm C++ backend

    def record(self) -> dict:
        return {"world_size": self.world_size, "cuda_memory_pool_bytes": self.cuda_memory_pool_bytes,
                "tensorrt_llm": self.tensorrt_llm, "cpp_llm": self.cpp_llm}


def engine_world_size(engine_config: dict) -> int:
    """tp * pp of a TensorRT-LLM engine config.json (pretrained_config.mapping)."""
    mapping = (engine_config.get("pretrained_config") or {}).get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", tp * pp))
    if world != tp * pp:
        raise ValueError(f"expected mapping.world_size == tp_size * pp_size ({tp} * {pp}), got {world}")
    return world


def read_launch(repo: str | os.PathLike) -> LaunchSpec:
    """The launch record `write_repository` left in the repository's marker file (defaults without one)."""
    from ..build.triton_spec import MARKER

    marker = Path(repo) / MARKER
    record = json.loads(marker.read_text()).get("launch") if marker.is_file() else None
    return LaunchSpec(**record) if record else LaunchSpec()


def check_server_trtllm(spec: LaunchSpec, installed: str | None) -> None:
    """Before loading: the server's TensorRT-LLM must be the one that built the engine (an engine of
    another release fails to deserialize, or worse)."""
    if spec.tensorrt_llm is not None and installed != spec.tensorrt_llm:
        raise RuntimeError(f"expected TensorRT-LLM {spec.tensorrt_llm} (it built the engine) where tritonserver runs, "
                           f"got {installed or 'none installed'}: serve from the container of that release or "
                           f"rebuild the engine (llm/build_engine.sh) there")


def installed_trtllm() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return None


def launch_argv(rank0: list[str], spec: LaunchSpec, *, mpirun: str = "mpirun", as_root: bool | None = None) -> list[str]:
    """The full command line. rank0: the single server's argv (executable first, with
    --model-repository, --backend-directory, a `--backend-config=python,shm-region-prefix-name=P`,
    its ports); for world_size > 1 it becomes rank 0 of an mpirun line and ranks 1.. load only the LLM."""
    prefix = next((a.split("=", 2)[2] for a in rank0 if a.startswith("--backend-config=python,shm-region-prefix-name=")),
                  None)
    if prefix is None:
        raise ValueError(f"expected --backend-config=python,shm-region-prefix-name=... in {rank0}")
    common = [a for a in rank0[1:] if a.startswith(("--model-repository=", "--backend-directory="))]

    def rank_prefix(r):
        return f"--backend-config=python,shm-region-prefix-name={prefix}r{r}_"

    first = [a if not a.startswith("--backend-config=python,shm-region-prefix-name=") else rank_prefix(0)
             for a in rank0]
    if spec.cpp_llm:  # the C++ LLM's repository: configs are complete, tables on GPU 0
        first += ["--disable-auto-complete-config"]
    if spec.cuda_memory_pool_bytes:
        first += [f"--cuda-memory-pool-byte-size=0:{spec.cuda_memory_pool_bytes}"]
    if spec.world_size == 1:
        return first
    as_root = (os.geteuid() == 0) if as_root is None else as_root
    argv = [mpirun] + (["--allow-run-as-root"] if as_root else [])
    for r in range(spec.world_size):
        ranks = first if r == 0 else [rank0[0], *common, rank_prefix(r), "--disable-auto-complete-config",
                                      "--model-control-mode=explicit", f"--load-model={LLM_MODEL}",
                                      "--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"]
        argv += ["-n", "1", *ranks] + ([":"] if r < spec.world_size - 1 else [])
    return argv
