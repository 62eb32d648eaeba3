"""af3trt.kernels: log-mel (torch + ONNX) and the Triton decode GEMVs.

The Triton kernels run under TRITON_INTERPRET=1 in a subprocess: triton reads the variable when
it is imported and when a kernel is defined, so setting it here would not work once any other
test (e.g. torch.compile) has imported triton. The subprocess runs this file as a script; it
saves each case's inputs and kernel outputs, and the tests compare them with the references here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from af3trt.features import log_mel, mel_filters, pad_windows
from af3trt.kernels import gemv as G
from af3trt.kernels.logmel import LogMelSTFT, dft_basis, log_mel_windows
from af3trt.spec import HOP_LENGTH, N_FFT, SAMPLE_RATE, WINDOW_SAMPLES

REPO = Path(__file__).resolve().parents[1]
LOG_MEL_ATOL = 1e-4
FP8_REL_RMS_BUDGET = 0.04  # weight-only FP8 (per-tensor e4m3) vs bf16 weights, Gaussian weights
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _subprocess_env(**extra) -> dict:
    """This environment, with the checkout importable (the package may not be installed)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


# ---------------------------------------------------------------- log-mel


def _windows() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(WINDOW_SAMPLES) / SAMPLE_RATE
    return [
        (0.1 * rng.standard_normal(WINDOW_SAMPLES)).astype(np.float32),  # full window of noise
        (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32),  # full window, pure tone
        (0.3 * np.sin(2 * np.pi * 1234.5 * t[:100_001])).astype(np.float32),  # partial, odd length
    ]


@pytest.fixture(scope="module")
def windows():
    raw = _windows()
    padded, _ = pad_windows(raw)
    return raw, padded, log_mel(padded).numpy()


def test_dft_basis_matches_rfft():
    frame = torch.randn(3, N_FFT, dtype=torch.float64)
    basis = dft_basis().double()
    bins = N_FFT // 2 + 1
    assert tuple(basis.shape) == (2 * bins, N_FFT)
    expected = torch.fft.rfft(frame * torch.hann_window(N_FFT, dtype=torch.float64))
    got = frame @ basis.T
    diff = max((got[:, :bins] - expected.real).abs().max().item(), (got[:, bins:] - expected.imag).abs().max().item())
    print(f"max diff basis vs rfft {diff:.2e}")
    assert diff < 1e-4  # float32 basis entries (rel 6e-8) times |frame| sums of ~400 terms


@pytest.mark.parametrize("method", ["auto", "stft", "dft"])
def test_log_mel_windows_matches_reference(windows, method):
    _, padded, ref = windows
    got = log_mel_windows(torch.from_numpy(padded), method=method).numpy()
    assert got.shape == (3, 128, 3000) and got.dtype == np.float32
    diffs = [float(np.abs(got[i] - ref[i]).max()) for i in range(len(ref))]
    print(f"method {method}: max diff per window vs features.log_mel {diffs}")
    assert max(diffs) <= LOG_MEL_ATOL


def test_log_mel_matches_whisper_feature_extractor(windows):
    from transformers import WhisperFeatureExtractor

    raw, padded, _ = windows
    fe = WhisperFeatureExtractor(feature_size=128)
    hf = fe(raw, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length").input_features
    for method in ("stft", "dft"):
        got = log_mel_windows(padded, method=method).numpy()
        diff = float(np.abs(got - hf).max())
        print(f"method {method}: max diff vs WhisperFeatureExtractor(feature_size=128) {diff:.2e}")
        assert diff <= LOG_MEL_ATOL


def test_dft_path_is_within_budget_of_float64_truth():
    """Quiet noise under a loud tone, partial window: the hard case for a float32 STFT."""
    rng = np.random.default_rng(7)
    n = 170_162
    t = np.arange(n) / SAMPLE_RATE
    samples = 1.2 * np.sin(2 * np.pi * 3210.7 * t + 0.4) + 1e-4 * rng.standard_normal(n)
    padded, _ = pad_windows([samples.astype(np.float32)])
    x64 = torch.from_numpy(padded).double()
    spec = torch.stft(x64, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT, dtype=torch.float64), return_complex=True)
    mel = torch.from_numpy(mel_filters()).T @ (spec[..., :-1].abs() ** 2)
    logspec = mel.clamp(min=1e-10).log10()
    truth = ((torch.maximum(logspec, logspec.amax(dim=(1, 2), keepdim=True) - 8.0) + 4.0) / 4.0).numpy()
    dft = log_mel_windows(padded, method="dft").numpy()
    ref = log_mel(padded).numpy()
    err_dft, err_ref = np.abs(dft - truth).max(), np.abs(ref - truth).max()
    print(f"max diff vs float64 truth: dft {err_dft:.2e}, torch.stft reference (features.log_mel) {err_ref:.2e}")
    assert err_dft <= LOG_MEL_ATOL


def test_log_mel_windows_validates_input():
    with pytest.raises(ValueError, match=r"expected windows of shape \(W, 480000\), got \(2, 16000\)"):
        log_mel_windows(torch.zeros(2, 16000))
    with pytest.raises(ValueError, match="expected float32 samples, got torch.float64"):
        log_mel_windows(torch.zeros(1, WINDOW_SAMPLES, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected method in"):
        log_mel_windows(torch.zeros(1, WINDOW_SAMPLES), method="fft")
    with pytest.raises(TypeError, match="expected a torch.Tensor or numpy array"):
        log_mel_windows([0.0] * WINDOW_SAMPLES)
    assert tuple(log_mel_windows(torch.zeros(0, WINDOW_SAMPLES)).shape) == (0, 128, 3000)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Constant folding - Only steps=1:UserWarning")
def test_log_mel_module_exports_to_onnx_and_runs_on_onnxruntime(windows, tmp_path):
    import onnx
    import onnxruntime as ort

    _, padded, ref = windows
    path = tmp_path / "log_mel.onnx"
    torch.onnx.export(
        LogMelSTFT().eval(),
        (torch.from_numpy(padded[:1]),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["samples"],
        output_names=["log_mel"],
        dynamic_axes={"samples": {0: "windows"}, "log_mel": {0: "windows"}},
    )
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    print(f"ONNX ops: {sorted(ops)}")
    assert "Conv" in ops and not ops & {"STFT", "DFT"}  # TensorRT has no STFT layer
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"samples": padded})[0]  # 3 windows through a graph traced with 1
    diff = float(np.abs(got - ref).max())
    print(f"onnxruntime vs features.log_mel: max diff {diff:.2e}")
    assert got.shape == ref.shape and diff <= LOG_MEL_ATOL


def test_strict_fp32_guard_turns_tf32_off_and_restores_legacy_flags():
    from af3trt.kernels.logmel import _strict_fp32

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        with _strict_fp32("cuda"):
            assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("highest", False)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)
        with _strict_fp32("cpu"):
            assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_strict_fp32_guard_follows_the_new_precision_api():
    """torch refuses legacy getters once `fp32_precision` was set: run where that happened."""
    code = (
        "import torch\n"
        "from af3trt.kernels.logmel import _strict_fp32\n"
        "m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv\n"
        "m.fp32_precision = c.fp32_precision = 'tf32'\n"
        "with _strict_fp32('cuda'):\n"
        "    assert (m.fp32_precision, c.fp32_precision) == ('ieee', 'ieee')\n"
        "assert (m.fp32_precision, c.fp32_precision) == ('tf32', 'tf32')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- GEMV: references, FP8 layout, wrappers


def test_quantize_fp8_weight_layout():
    w = torch.randn(96, 256) * 0.02
    w_fp8, scale = G.quantize_fp8_weight(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and tuple(w_fp8.shape) == (96, 256)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (1,)  # TRT-LLM weights_scaling_factor
    torch.testing.assert_close(scale, w.abs().amax().reshape(1) / G.FP8_E4M3_MAX)
    assert w_fp8.float().abs().max().item() == G.FP8_E4M3_MAX  # amax maps onto e4m3's largest value
    deq = G.dequantize_fp8_weight(w_fp8, scale)
    torch.testing.assert_close(deq, w_fp8.float() * scale)
    # e4m3 keeps 3 mantissa bits: rel error <= 2^-4 for normals, abs <= 2^-10 * scale for subnormals
    bound = torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10)
    assert bool(((deq - w).abs() <= bound * 1.0001).all())

    w_fp8_pc, scale_pc = G.quantize_fp8_weight(w, per_channel=True)
    assert tuple(scale_pc.shape) == (96,) and scale_pc.dtype == torch.float32
    torch.testing.assert_close(scale_pc, w.abs().amax(dim=1) / G.FP8_E4M3_MAX)
    assert torch.equal(w_fp8_pc.float().abs().amax(dim=1), torch.full((96,), G.FP8_E4M3_MAX))

    zero_fp8, zero_scale = G.quantize_fp8_weight(torch.zeros(4, 32), per_channel=True)
    assert torch.equal(zero_scale, torch.ones(4)) and not zero_fp8.float().any()


def test_fp8_weight_only_error_budget_vs_bf16():
    torch.manual_seed(0)
    x = torch.randn(8, 1024).bfloat16()
    w = (torch.randn(512, 1024) / 32).bfloat16()
    ref = G.gemv_bf16_reference(x, w).float()
    for per_channel in (False, True):
        got = G.gemv_fp8_reference(x, *G.quantize_fp8_weight(w, per_channel=per_channel)).float()
        rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        print(f"per_channel={per_channel}: FP8 vs bf16 relative RMS error {rel:.4f} (budget {FP8_REL_RMS_BUDGET})")
        assert rel <= FP8_REL_RMS_BUDGET


def _operands(m=2, n=96, k=256):
    x = torch.randn(m, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    w_fp8, scale = G.quantize_fp8_weight(w)
    return x, w, w_fp8, scale


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, w, q, s: G.gemv_bf16(x.half(), w), ValueError, "expected x dtype torch.bfloat16, got torch.float16"),
        (
            lambda x, w, q, s: G.gemv_bf16(torch.zeros(9, 256, dtype=torch.bfloat16), w),
            ValueError,
            r"expected x of shape \(M <= 8, K\), got \(9, 256\)",
        ),
        (lambda x, w, q, s: G.gemv_bf16(x[0], w), ValueError, r"got \(256,\)"),
        (
            lambda x, w, q, s: G.gemv_bf16(x, w[:, :128]),
            ValueError,
            r"expected weight of shape \(N, 256\), got \(96, 128\)",
        ),
        (lambda x, w, q, s: G.gemv_bf16(x, w.T.contiguous().T), ValueError, "expected a contiguous"),
        (lambda x, w, q, s: G.gemv_bf16(x.T.contiguous().T, w), ValueError, r"stride\(-1\) == 1"),
        (
            lambda x, w, q, s: G.gemv_bf16(x, q),
            ValueError,
            "expected weight dtype torch.bfloat16, got torch.float8_e4m3fn",
        ),
        (lambda x, w, q, s: G.gemv_bf16(x.float().numpy(), w), TypeError, "expected x to be a torch.Tensor"),
        (
            lambda x, w, q, s: G.gemv_bf16(x, w, torch.zeros(95, dtype=torch.bfloat16)),
            ValueError,
            r"expected bias of shape \(96,\)",
        ),
        (lambda x, w, q, s: G.gemv_bf16(x, w, torch.zeros(96)), ValueError, "expected a contiguous bfloat16 bias"),
        (lambda x, w, q, s: G.gemv_bf16(x, w.to("meta")), ValueError, "expected weight on cpu, got meta"),
        (lambda x, w, q, s: G.gemv_fp8(x, q, s.to("meta")), ValueError, "expected scale on cpu, got meta"),
        (
            lambda x, w, q, s: G.gemv_fp8(x, w, s),
            ValueError,
            "expected weight dtype torch.float8_e4m3fn, got torch.bfloat16",
        ),
        (
            lambda x, w, q, s: G.gemv_fp8(x, q, s.double()),
            ValueError,
            "expected scale dtype torch.float32, got torch.float64",
        ),
        (
            lambda x, w, q, s: G.gemv_fp8(x, q, torch.ones(2)),
            ValueError,
            r"expected scale of shape \(1,\) or \(96,\), got \(2,\)",
        ),
        (lambda x, w, q, s: G.gemv_fp8(x, q, 0.5), TypeError, "expected scale to be a float32 torch.Tensor, got float"),
    ],
)
def test_gemv_wrappers_reject_bad_operands(call, error, message):
    with pytest.raises(error, match=message):
        call(*_operands())


def test_gemv_config_rejects_bad_blocks():
    with pytest.raises(ValueError, match="expected block_n a power of two >= 16"):
        G.GemvConfig(block_n=24, block_k=128)
    with pytest.raises(ValueError, match="expected split_k >= 1, got 0"):
        G.GemvConfig(block_n=32, block_k=128, split_k=0)


def test_gemv_falls_back_to_reference_off_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def no_kernels(*_):
        raise AssertionError("a Triton kernel was launched on CPU without TRITON_INTERPRET=1")

    monkeypatch.setattr(G, "_kernels", no_kernels)
    x, w, w_fp8, scale = _operands()
    bias = torch.randn(96).bfloat16()
    assert torch.equal(G.gemv_bf16(x, w, bias), G.gemv_bf16_reference(x, w, bias))
    assert torch.equal(G.gemv_fp8(x, w_fp8, scale, bias), G.gemv_fp8_reference(x, w_fp8, scale, bias))


@pytest.mark.parametrize("fp8", [False, True])
def test_gemv_config_covers_decode_shapes(fp8):
    for name, (n, k) in G.DECODE_SHAPES.items():
        cfg = G.gemv_config(n, k, fp8=fp8)
        programs = cfg.programs(n, k)
        print(f"{name} {(n, k)} fp8={fp8}: {cfg} -> {programs} programs")
        assert programs >= G.DEFAULT_SMS * 3, f"{name}: {programs} programs cannot fill {G.DEFAULT_SMS} SMs"
        assert cfg.block_k * (1 if fp8 else 2) == 256  # 256 B of a weight row per K step
    cfg = G.gemv_config(1000, 5000, fp8=fp8)  # heuristic path
    assert cfg.split_k > 1 and cfg.block_n == 32


# ---------------------------------------------------------------- GEMV kernels under TRITON_INTERPRET=1

# (id, fp8 scale kind or None, M, K, (block_n, block_k, split_k) or None for gemv_config, bias)
KERNEL_CASES = [
    ("bf16-m1-k256", None, 1, 256, (32, 128, 1), False),
    ("bf16-m1-k200-split3-bias", None, 1, 200, (16, 32, 3), True),
    ("bf16-m3-k256-split4-bias", None, 3, 256, (32, 64, 4), True),
    ("bf16-m3-k200", None, 3, 200, (32, 128, 1), False),
    ("bf16-m8-k200-split3-bias", None, 8, 200, (16, 32, 3), True),
    ("bf16-m8-k256-default", None, 8, 256, None, False),
    ("fp8-tensor-m1-k256", "tensor", 1, 256, (32, 256, 1), False),
    ("fp8-tensor-m3-k200-n64-split3-bias", "tensor", 3, 200, (64, 32, 3), True),
    ("fp8-tensor-m8-k256-split2", "tensor", 8, 256, (16, 128, 2), False),
    ("fp8-channel-m1-k200-split3-bias", "channel", 1, 200, (16, 32, 3), True),
    ("fp8-channel-m8-k200", "channel", 8, 200, (32, 256, 1), False),
]
KERNEL_N = 96  # not a multiple of 64: the last column tile is masked


def _run_kernel_cases(out_path: str) -> None:
    """Subprocess body (TRITON_INTERPRET=1): run every case through the Triton wrappers, save all."""
    assert os.environ.get("TRITON_INTERPRET") == "1"

    def not_the_reference(*_, **__):
        raise AssertionError("the wrapper fell back to the torch reference instead of the Triton kernel")

    G.gemv_bf16_reference = G.gemv_fp8_reference = not_the_reference  # this process only
    results = {}
    for i, (case_id, fp8, m, k, cfg, with_bias) in enumerate(KERNEL_CASES):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(m, k, generator=gen).bfloat16()
        w = (torch.randn(KERNEL_N, k, generator=gen) / k**0.5).bfloat16()
        bias = torch.randn(KERNEL_N, generator=gen).bfloat16() if with_bias else None
        config = G.GemvConfig(*cfg) if cfg else None
        case = {"x": x, "w": w}
        if bias is not None:
            case["bias"] = bias
        if fp8:
            w_fp8, scale = G.quantize_fp8_weight(w, per_channel=fp8 == "channel")
            case.update(w=w_fp8.view(torch.uint8), scale=scale, y=G.gemv_fp8(x, w_fp8, scale, bias, config=config))
        else:
            case["y"] = G.gemv_bf16(x, w, bias, config=config)
        results[case_id] = case
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton_interpret") / "cases.pt"
    env = _subprocess_env(TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"interpreted kernel run failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_triton_gemv_matches_reference_interpreted(interpreted, case):
    case_id, fp8, _, _, _, _ = case
    data = interpreted[case_id]
    x, bias, got = data["x"], data.get("bias"), data["y"]
    if fp8:
        w_fp8 = data["w"].view(torch.float8_e4m3fn)
        weight = G.dequantize_fp8_weight(w_fp8, data["scale"])
        reference = G.gemv_fp8_reference(x, w_fp8, data["scale"], bias)
    else:
        weight = data["w"].float()
        reference = G.gemv_bf16_reference(x, data["w"], bias)
    truth = x.double() @ weight.double().T + (0.0 if bias is None else bias.double())
    # same-precision reference: torch's bf16 linear on the (bf16-rounded) effective weight
    same_precision = torch.nn.functional.linear(x, weight.bfloat16(), bias)
    err_kernel = (got.double() - truth).abs().max().item()
    err_torch = (same_precision.double() - truth).abs().max().item()
    err_ref = (got.float() - reference.float()).abs().max().item()
    print(f"{case_id}: max err vs fp64: kernel {err_kernel:.3e}, torch bf16 linear {err_torch:.3e}")
    print(f"{case_id}: max diff kernel vs reference {err_ref:.3e}")
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == (x.shape[0], KERNEL_N)
    assert err_kernel <= 2 * err_torch + 1e-6


# ---------------------------------------------------------------- GPU (full shapes)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("name", list(G.DECODE_SHAPES))
def test_gpu_gemv_full_decode_shapes(name, m):
    pytest.importorskip("triton")
    n, k = G.DECODE_SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
    cases = [("bf16", w.float(), G.gemv_bf16(x, w))]
    for per_channel in (False, True):
        w_fp8, scale = G.quantize_fp8_weight(w, per_channel=per_channel)
        cases.append(
            (f"fp8 per_channel={per_channel}", G.dequantize_fp8_weight(w_fp8, scale), G.gemv_fp8(x, w_fp8, scale))
        )
    for label, weight, got in cases:
        truth = x.double() @ weight.double().T
        err_kernel = (got.double() - truth).abs().max().item()
        err_torch = (torch.nn.functional.linear(x, weight.bfloat16()).double() - truth).abs().max().item()
        print(f"{name} M={m} {label}: max err kernel {err_kernel:.3e}, cuBLAS bf16 {err_torch:.3e}")
        assert err_kernel <= 2 * err_torch + 1e-6


@pytest.mark.gpu
@CUDA
def test_gpu_log_mel_matches_reference(windows):
    _, padded, ref = windows
    torch.backends.cudnn.allow_tf32 = True  # the module must not inherit TF32, and must restore it
    for method in ("auto", "stft", "dft"):
        got = log_mel_windows(torch.from_numpy(padded).cuda(), method=method).cpu().numpy()
        diff = float(np.abs(got - ref).max())
        print(f"CUDA {method}: max diff vs CPU features.log_mel {diff:.2e}")
        assert diff <= LOG_MEL_ATOL
    assert torch.backends.cudnn.allow_tf32


@pytest.mark.gpu
@CUDA
def test_gpu_kernels_bench_quick(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernels_bench", REPO / "benchmarks" / "kernels_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--out", str(tmp_path), "--quick"])
    assert result["copy_bandwidth_gbps"] > 0 and result["gemv"] and result["log_mel"]
    assert not [row for row in result["gemv"] if row.get("error")]
    assert (tmp_path / "kernels_bench.json").is_file()


if __name__ == "__main__":
    _run_kernel_cases(sys.argv[1])


@pytest.mark.gpu
@CUDA
def test_gpu_pipeline_front_end_gives_the_cpu_tokens(tiny_dir):
    """The CUDA pipeline (device log-mel kept on the GPU, fp32 torch encoder and decoder) answers
    with the CPU pipeline's greedy tokens."""
    from af3trt.runtime import Pipeline
    from af3trt.audio import synthetic_audio

    conv = [{"role": "user", "content": [{"type": "audio", "audio": synthetic_audio(37.0, 5)},
                                         {"type": "text", "text": "Transcribe the input speech."}]}]
    cpu = Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="float32").generate(conv, max_new_tokens=8)[0]
    gpu = Pipeline.from_pretrained(tiny_dir, decoder="torch", device="cuda", dtype="float32")
    got = gpu.generate(conv, max_new_tokens=8)[0]
    print("cpu", cpu.token_ids, "cuda", got.token_ids, "timings", got.timings)
    assert got.token_ids == cpu.token_ids and got.num_audio_tokens == cpu.num_audio_tokens
