"""What build writes and runtime reads (docs/architecture.md): the engine-dir manifest and its stage
records, the TensorRT-LLM checkpoint names and read-back, the encoder I/O contract, the Triton
cancel markers. Torch-free; importing the package imports none of its modules."""
