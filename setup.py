from setuptools import find_packages, setup

BASE = [
    "torch>=2.4",
    "numpy>=1.24,<2",  # nvidia-pytriton's python backend breaks on numpy 2 (reference/triton-cpu.md)
    "transformers>=4.57",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "soundfile>=0.12",
    "soxr>=0.3",
    "onnx>=1.16",
    "onnxruntime>=1.18",
    "nvidia-modelopt>=0.35",
    "requests",  # modelopt.torch.quantization imports it without declaring it (ModelOpt 0.47)
    # modelopt.onnx.quantization needs these; nvidia-modelopt[onnx] pins onnx/onnxruntime-gpu versions
    # that clash with onnx 1.23 / onnxruntime 1.32, so they are listed one by one
    "onnx-graphsurgeon==0.6.1",
    "onnxscript==0.7.2",
    "onnxslim==0.1.98",
    "lief==1.0.0",
    "tqdm",
    "rich",
    # af3trt openai (FastAPI + uvicorn, multipart for /v1/audio/transcriptions)
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "python-multipart>=0.0.9",
]

setup(
    name="af3trt",
    version="0.1.0",
    description="TensorRT / TensorRT-LLM engines, runtime, Triton repository and benchmarks for Audio Flamingo 3",
    packages=find_packages(include=["af3trt", "af3trt.*"]),
    package_data={"af3trt": ["assets/*", "build/templates/*", "build/templates/**/*"]},
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require={
        "triton": ["tritonclient[all]>=2.40", "nvidia-pytriton>=0.5"],
        "bench": ["matplotlib>=3.7", "jiwer>=3"],
        # the GEMV kernels use long-standing triton.language only (load/dot/trans/sum): any 3.5+ runs them,
        # so the TensorRT-LLM 1.2.1 container's triton 3.5.1 is kept (.ci/trtllm-1.2-constraints.txt)
        "kernels": ["triton>=3.5.1"],
        "dev": ["pytest>=8", "triton==3.9.0", "tritonclient[all]>=2.40", "nvidia-pytriton>=0.5", "matplotlib>=3.7", "jiwer>=3",
                # the AF3-Think reference of tests/test_think.py (af3trt merges the adapter without it)
                "peft==0.21.2",
                "openai>=1.40"],  # the client tests/test_openai.py drives af3trt openai with
        # from NVIDIA's index / containers only (PyPI holds stub sdists): see README
        "trt": ["tensorrt"],
        "trtllm": ["tensorrt_llm"],
    },
    entry_points={"console_scripts": ["af3trt=af3trt.cli:main"]},
)
