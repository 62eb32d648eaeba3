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
`write_repository` records the size for the largest tables (`pool_bytes`, in `af3trt.build.triton_spec`
with the rest of the repository's launch record).
"""

from __future__ import annotations

import os
from importlib import metadata

from ..build.triton_spec import (  # the repository's own launch record; callers import it from here too
    LLM_MODEL, MIN_POOL_BYTES, LaunchSpec, engine_world_size, pool_bytes, read_launch,
)

__all__ = ["LLM_MODEL", "MIN_POOL_BYTES", "LaunchSpec", "check_server_trtllm", "engine_world_size", "installed_trtllm",
           "launch_argv", "pool_bytes", "read_launch"]


def check_server_trtllm(spec: LaunchSpec, installed: str | None) -> None:
    """Before loading: the server's TensorRT-LLM must be the one that built the engine (an engine of
    another release fails to deserialize, or worse)."""
    if spec.tensorrt_llm is not None and installed != spec.tensorrt_llm:
        raise RuntimeError(f"expected TensorRT-LLM {spec.tensorrt_llm} (it built the engine) where tritonserver runs, "
                           f"got {installed or 'none installed'}: serve from the container of that release or "
                           f"rebuild the engine (llm/build_engine.sh) there")


def installed_trtllm() -> str | None:
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
