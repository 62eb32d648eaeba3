"""GPU kernels the runtime needs outside the TensorRT / TensorRT-LLM engines.

Each kernel sits beside its validating wrapper and a pure-torch reference (STYLE rule 9):

- `logmel`: batched Whisper log-mel of 30 s windows, (W, 480000) float32 -> (W, 128, 3000)
  float32, as torch ops (`torch.stft` in eager, a conv1d DFT basis for ONNX / TensorRT).
- `gemv`: OpenAI Triton decode linears for batch <= 8: split-K bf16 GEMV and weight-only FP8
  GEMV (float8_e4m3fn weights, float32 scales, bf16 in/out).

Importing this package (or `logmel`, `gemv`) needs neither triton nor CUDA: triton is imported
lazily when a kernel first runs, and the wrappers fall back to the torch references off CUDA.
"""
