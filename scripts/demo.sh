#!/usr/bin/env bash
# The main job on the embedded tiny model: build its engine dir (ONNX encoder, TensorRT-LLM
# checkpoint; the TensorRT plan and trtllm-build stages run where tensorrt / tensorrt_llm are
# installed and are recorded with their finishing command elsewhere), then answer a question
# about the bundled clip with the engine dir.
step="setting up the venv (scripts/env.sh)"
trap 'echo "af3trt demo: stopped while $step (its error is above). Rerun scripts/demo.sh: the venv and" \
          "finished build stages are kept; scripts/test.sh runs the test suite." >&2' ERR
source "$(dirname "$0")/env.sh"
OUT="${1:-$ROOT/out/tiny-engine}"
step="building the engine dir $OUT (af3trt build)"
af3trt build --model tiny --out "$OUT" --precision "${AF3TRT_PRECISION:-bf16}"
# greedy (--no-do-sample) keeps the answer deterministic: the checkpoint's generation_config samples
step="answering the prompt (af3trt run)"
af3trt run --model "$OUT" --audio af3trt/assets/speech.wav --prompt "Transcribe the input speech." --no-do-sample --json
echo "af3trt demo: built the tiny model's engine dir in $OUT and answered a prompt about the bundled clip" \
     "(random weights: random text). Next: 'source .venv/bin/activate', then 'af3trt --help', or serve it:" \
     "'af3trt triton --engine-dir $OUT --out repo-cpu --llm-backend python && af3trt serve --repo repo-cpu'" >&2
