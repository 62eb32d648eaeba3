"""What build writes and runtime reads (docs/architecture.md): the engine-dir manifest and its stage
records, the one Limits record, the precision registry, the encoder I/O contract, the TensorRT-LLM
checkpoint names and engine config, the Triton cancel markers. Torch-free; imports none of them."""
