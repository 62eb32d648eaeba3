"""af3trt: Audio Flamingo 3 on TensorRT / TensorRT-LLM, with a torch reference runtime.

`import af3trt` needs only the base dependencies; TensorRT and TensorRT-LLM are imported lazily.
"""

__version__ = "0.1.0"
