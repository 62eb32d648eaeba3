#!/usr/bin/env bash
# The main job on the embedded tiny model: build its engine dir (ONNX encoder, TensorRT-LLM
# checkpoint; the TensorRT plan and trtllm-build stages run where tensorrt / tensorrt_llm are
# installed and are recorded with their finishing command elsewhere), then answer a question
# about the bundled clip with the engine dir.
source "$(dirname "$0")/env.sh"
OUT="${1:-$ROOT/out/tiny-engine}"
af3trt build --model tiny --out "$OUT" --precision "${AF3TRT_PRECISION:-bf16}"
# greedy (--no-do-sample) keeps the answer deterministic: the checkpoint's generation_config samples
af3trt run --model "$OUT" --audio af3trt/assets/speech.wav --prompt "Transcribe the input speech." --no-do-sample --json
