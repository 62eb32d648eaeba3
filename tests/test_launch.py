"""TP > 1 engines are launched one rank per GPU under mpirun, as NVIDIA's launch_triton_server.py
does, and refused by the in-process decoder with the command that works (issue 12, finding 2). No MPI
runs here: the launch line, each rank's flags and the repository's parameters are what is tested."""

import json

import pytest

from af3trt.build.triton import write_repository
from af3trt.build.triton_spec import MARKER
from af3trt.serving.launch import LaunchSpec, check_server_trtllm, launch_argv, pool_bytes, read_launch

from .test_triton import fake_engine_dir, parse_repository

RANK0 = ["/opt/tritonserver/bin/tritonserver", "--model-repository=/models/repo",
         "--backend-directory=/opt/tritonserver/backends", "--http-address=0.0.0.0", "--grpc-address=0.0.0.0",
         "--http-port=8000", "--grpc-port=8001", "--backend-config=python,shm-region-prefix-name=af3trt_1_ab",
         "--metrics-address=0.0.0.0", "--metrics-port=8002"]


def tp_engine_dir(tiny_dir, root, tp):
    root = fake_engine_dir(tiny_dir, root)
    path = root / "llm" / "engine" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["pretrained_config"]["mapping"] = {"world_size": tp, "tp_size": tp, "pp_size": 1}
    path.write_text(json.dumps(cfg))
    return root


def ranks(argv):
    """mpirun [opts] -n 1 A... : -n 1 B... -> [A..., B...]"""
    out, cur = [], None
    for a in argv[1:]:
        if a == "-n":
            cur = []
            out.append(cur)
        elif a == ":" or cur is None:
            continue
        elif cur == [] and a == "1":
            cur.append(None)
        else:
            cur.append(a)
    return [[x for x in r if x is not None] for r in out]


def test_tp2_repository_records_the_world_and_sets_gpu_device_ids(tiny_dir, tmp_path):
    engine = tp_engine_dir(tiny_dir, tmp_path / "engine", 2)
    repo = write_repository(engine, tmp_path / "repo", llm_backend="tensorrtllm")
    params = {k: v.string_value for k, v in parse_repository(repo.path)["tensorrt_llm"].parameters.items()}
    assert params["gpu_device_ids"] == "0,1"
    spec = read_launch(repo.path)
    print(spec)
    lim = repo.limits
    assert spec.world_size == 2 and spec.cpp_llm
    assert spec.cuda_memory_pool_bytes == pool_bytes(lim.max_audio_tokens, 128, 2, lim.max_batch_size)
    one = write_repository(fake_engine_dir(tiny_dir, tmp_path / "e1"), tmp_path / "repo1", llm_backend="tensorrtllm")
    assert "gpu_device_ids" not in {k for k in parse_repository(one.path)["tensorrt_llm"].parameters}
    assert read_launch(one.path).world_size == 1


def test_mpirun_line_one_rank_per_gpu():
    spec = LaunchSpec(world_size=2, cuda_memory_pool_bytes=430_000_000, tensorrt_llm="1.2.1", cpp_llm=True)
    argv = launch_argv(RANK0, spec, as_root=True)
    print(" ".join(argv))
    assert argv[:2] == ["mpirun", "--allow-run-as-root"] and argv.count(":") == 1
    r0, r1 = ranks(argv)
    assert r0[0] == r1[0] == RANK0[0]
    assert "--http-port=8000" in r0 and "--cuda-memory-pool-byte-size=0:430000000" in r0
    assert "--disable-auto-complete-config" in r0 and "--disable-auto-complete-config" in r1
    assert "--model-control-mode=explicit" not in r0
    assert r1[1:3] == ["--model-repository=/models/repo", "--backend-directory=/opt/tritonserver/backends"]
    assert {"--model-control-mode=explicit", "--load-model=tensorrt_llm", "--allow-http=false",
            "--allow-grpc=false", "--allow-metrics=false"} <= set(r1)
    assert not any(a.startswith(("--http-port", "--grpc-port", "--cuda-memory-pool")) for a in r1)
    prefixes = [next(a for a in r if "shm-region-prefix-name" in a) for r in (r0, r1)]
    assert prefixes == ["--backend-config=python,shm-region-prefix-name=af3trt_1_abr0_",
                        "--backend-config=python,shm-region-prefix-name=af3trt_1_abr1_"]
    assert launch_argv(RANK0, spec, as_root=False)[1] == "-n"


def test_single_rank_is_one_server_and_python_llm_repositories_are_unchanged():
    one = launch_argv(RANK0, LaunchSpec(world_size=1, cuda_memory_pool_bytes=300_000_000, cpp_llm=True))
    assert one[0] == RANK0[0] and "--cuda-memory-pool-byte-size=0:300000000" in one
    assert launch_argv(RANK0, LaunchSpec())[:len(RANK0)] == [
        a.replace("af3trt_1_ab", "af3trt_1_abr0_") for a in RANK0]
    assert len(launch_argv(RANK0, LaunchSpec())) == len(RANK0)


def test_pool_holds_the_largest_tables():
    assert pool_bytes(15000, 3584, 2, 1) == 300_000_000  # 107.5 MB per 10-min table: NVIDIA's 300 MB floor
    assert pool_bytes(15000, 3584, 2, 4) == 15000 * 3584 * 2 * 4


def test_the_server_must_run_the_engines_tensorrt_llm():
    check_server_trtllm(LaunchSpec(tensorrt_llm="1.2.1"), "1.2.1")
    check_server_trtllm(LaunchSpec(), None)  # python LLM
    with pytest.raises(RuntimeError, match=r"expected TensorRT-LLM 1.2.1 .* got 1.2.0"):
        check_server_trtllm(LaunchSpec(tensorrt_llm="1.2.1"), "1.2.0")
    with pytest.raises(RuntimeError, match="got none installed"):
        check_server_trtllm(LaunchSpec(tensorrt_llm="1.2.1"), None)


def test_in_process_decoder_refuses_tp2_with_the_command_that_works(tiny_dir, tmp_path):
    from af3trt.runtime.trtllm import check_single_rank
    from af3trt.formats.trtllm_engine import engine_config

    engine = tp_engine_dir(tiny_dir, tmp_path / "engine", 2)
    with pytest.raises(ValueError, match=r"tp_size 2 x pp_size 1 = 2 ranks .* af3trt triton --engine-dir .* "
                                         r"&& af3trt serve --repo REPO \(mpirun -n 2\)"):
        check_single_rank(engine_config(engine / "llm" / "engine"), engine / "llm" / "engine")
    check_single_rank(engine_config(fake_engine_dir(tiny_dir, tmp_path / "e1") / "llm" / "engine"), "x")


def test_marker_without_launch_record_means_one_server(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"engine_dir": "x"}))
    assert read_launch(tmp_path) == LaunchSpec()


def test_kv_cache_fraction_leaves_memory_for_the_other_models(tiny_dir, tmp_path):
    engine = fake_engine_dir(tiny_dir, tmp_path / "engine")

    def fraction(**kw):
        repo = write_repository(engine, tmp_path / f"repo{len(kw)}{kw.get('kv_cache_free_gpu_mem_fraction')}",
                                llm_backend="tensorrtllm", **kw)
        params = parse_repository(repo.path)["tensorrt_llm"].parameters
        return params["kv_cache_free_gpu_mem_fraction"].string_value

    assert fraction() == "0.8" and fraction(kv_cache_free_gpu_mem_fraction=0.6) == "0.6"
    with pytest.raises(ValueError, match=r"expected kv_cache_free_gpu_mem_fraction in \(0, 1\), got 1.2"):
        fraction(kv_cache_free_gpu_mem_fraction=1.2)
