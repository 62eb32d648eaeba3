"""Audio encoder + projector: (W, 128, 3000) log-mel windows -> (W, 750, hidden) embeddings.

`AudioEncoder` is af3trt's own torch module of AF3's audio path (Whisper conv front end, pre-LN
transformer layers with a key-padding mask, AvgPool1d(2), LayerNorm, 2-layer GELU projector); its
parameter names are the checkpoint's (`audio_tower.*` without prefix, `projector.*`). Backends share
one interface: `backend(inputs, frames) -> (W, 750, hidden)` torch tensor, where rows past a
window's valid count (`valid_rows`) are padding, a `name`, and `takes`: what `inputs` is, "features"
(log-mel windows) or "audio" (zero-padded 16 kHz windows; the graph computes the log-mel itself):
- `TorchEncoder` ("torch"): this module, on the checkpoint's weights;
- `OnnxRuntimeEncoder` ("onnxruntime"): ENGINE_DIR/encoder/encoder.onnx (af3trt.build.encoder);
- `TensorRTEncoder` ("tensorrt"): ENGINE_DIR/encoder/encoder.plan, on its own CUDA stream (ordered with the caller's).
`load_encoder(name, path)` picks one; `available_encoders(path)` lists them best first.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import dtypes
from ..checkpoint import ENCODER_PREFIX, PROJECTOR_PREFIX, Checkpoint
from ..errors import MissingDependency, MissingInputError, OptionError
from ..spec import (FRAMES_PER_WINDOW, N_MELS, TOKENS_PER_WINDOW, WINDOW_SAMPLES, AudioSpec, ModelSpec,
                    audio_token_count, conv_frames)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d)
        self.self_attn.k_proj = nn.Linear(d, d, bias=False)
        self.self_attn.v_proj = nn.Linear(d, d)
        self.self_attn.out_proj = nn.Linear(d, d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (W, S, d); bias (W, 1, 1, S) additive key mask (0 valid, -inf padding)."""
        w, s, d = x.shape
        h = self.self_attn_layer_norm(x)
        a = self.self_attn

        def heads(t):
            return t.view(w, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(a.q_proj(h)), heads(a.k_proj(h)), heads(a.v_proj(h))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + a.out_proj(o.transpose(1, 2).reshape(w, s, d))
        h = self.final_layer_norm(x)
        return x + self.fc2(F.gelu(self.fc1(h)))


class AudioEncoder(nn.Module):
    """AF3 audio tower + projector. forward(features (W,128,3000) float, frames (W,) int) -> (W, 750, H)."""

    def __init__(self, audio: AudioSpec, text_hidden: int, projector_bias: bool = True):
        super().__init__()
        if audio.activation != "gelu":
            raise ValueError(f"expected the audio encoder's activation 'gelu', got {audio.activation!r}")
        d = audio.hidden_size
        self.spec = audio
        self.conv1 = nn.Conv1d(audio.num_mel_bins, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(audio.max_source_positions, d)
        self.layers = nn.ModuleList(
            EncoderLayer(d, audio.num_heads, audio.intermediate_size) for _ in range(audio.num_layers)
        )
        self.layer_norm = nn.LayerNorm(d)
        self.projector = nn.Module()
        self.projector.linear_1 = nn.Linear(d, text_hidden, bias=projector_bias)
        self.projector.linear_2 = nn.Linear(text_hidden, text_hidden, bias=projector_bias)

    @classmethod
    def from_checkpoint(cls, ckpt, dtype=torch.float32) -> "AudioEncoder":
        spec: ModelSpec = ckpt.spec
        model = cls(spec.audio, spec.text.hidden_size, spec.projector_bias)
        state = ckpt.load(ENCODER_PREFIX)
        state.update({f"projector.{k}": v for k, v in ckpt.load(PROJECTOR_PREFIX).items()})
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (W, 1500, d)
        x = x + self.embed_positions.weight[: x.shape[1]]
        valid = conv_frames(frames.to(torch.long))  # conv2 positions holding real frames
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, -math.inf)
        bias = bias[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)  # (W, 750, d)
        x = self.layer_norm(x)
        return self.projector.linear_2(F.gelu(self.projector.linear_1(x)))


def valid_rows(frames) -> list[int]:
    """Valid embedding rows per window for (W,) valid mel frames."""
    return [int(audio_token_count(int(f))) for f in frames]


class TorchEncoder:
    """Encoder backend on af3trt's torch module. __call__(features, frames) -> (W, 750, H) tensor."""

    name = "torch"
    takes = "features"

    def __init__(self, module: AudioEncoder, device: str | torch.device = "cpu", max_windows_per_call: int = 8):
        self.module = module.to(device)
        self.device = torch.device(device)
        self.dtype = next(module.parameters()).dtype
        self.max_windows_per_call = max_windows_per_call

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu", dtype=torch.float32) -> "TorchEncoder":
        return cls(AudioEncoder.from_checkpoint(ckpt, dtype), device)

    @torch.inference_mode()
    def __call__(self, features, frames) -> torch.Tensor:
        feats = torch.as_tensor(features, device=self.device, dtype=self.dtype)
        frames = torch.as_tensor(frames, device=self.device)
        outs = [
            self.module(feats[i : i + self.max_windows_per_call], frames[i : i + self.max_windows_per_call])
            for i in range(0, feats.shape[0], self.max_windows_per_call)
        ]
        return torch.cat(outs) if outs else feats.new_zeros((0, 0, 0))


# -- deployable backends: the exported graph on ONNX Runtime or TensorRT -------------------------

ENCODER_DIR = "encoder"  # ENGINE_DIR/encoder/ (DESIGN §3)
ONNX_FILE = "encoder.onnx"
ONNX_DATA_FILE = "encoder.onnx.data"  # external weights, one file, when the graph is large
PLAN_FILE = "encoder.plan"
CONFIG_FILE = "config.json"


INPUT_KINDS = ("features", "audio")  # what an encoder graph takes first (EncoderIO.takes)


@dataclass(frozen=True)
class EncoderIO:
    """Names, dtypes and the dynamic axis of the encoder graph, declared once for export, build, runtime.

    The first input is, per `takes`, either `features`: (W, 128, 3000) float32 log-mel, or `audio`:
    (W, 480000) float32 zero-padded 16 kHz windows (`af3trt.features.pad_windows`), from which the
    graph computes the log-mel itself (`af3trt.kernels.logmel`, method "dft"); `signal` names it.
    frames: (W,) int64 valid mel frames per window (the graph masks attention keys past them exactly
    as `AudioEncoder` does); embeddings: (W, 750, hidden) float32 (float16 for an fp16 graph). W, the
    window axis, is the only dynamic axis. `IO` takes features; `IO.for_input("audio")` takes audio.
    """

    features: str = "features"
    audio: str = "audio"
    frames: str = "frames"
    embeddings: str = "embeddings"
    windows: str = "windows"
    features_dtype: str = "float32"
    audio_dtype: str = "float32"
    frames_dtype: str = "int64"
    takes: str = "features"

    def __post_init__(self):
        if self.takes not in INPUT_KINDS:
            raise ValueError(f"expected an encoder input kind in {INPUT_KINDS}, got {self.takes!r}")

    def for_input(self, takes: str) -> "EncoderIO":
        """The same names for a graph that takes `takes` ("features" | "audio")."""
        return replace(self, takes=takes)

    def for_names(self, inputs, outputs, where: str) -> "EncoderIO":
        """The I/O of a graph or engine with these tensor names (an `audio` input: takes audio), checked."""
        io = self.for_input("audio" if self.audio in list(inputs) else "features")
        io.check_names(inputs, outputs, where)
        return io

    @property
    def signal(self) -> str:
        """Name of the first input: `features` or `audio`, per `takes`."""
        return self.audio if self.takes == "audio" else self.features

    @property
    def signal_dtype(self) -> str:
        return self.audio_dtype if self.takes == "audio" else self.features_dtype

    def signal_shape(self, windows) -> tuple:
        return (windows, WINDOW_SAMPLES) if self.takes == "audio" else (windows, N_MELS, FRAMES_PER_WINDOW)

    @property
    def inputs(self) -> tuple[str, str]:
        return (self.signal, self.frames)

    @property
    def outputs(self) -> tuple[str]:
        return (self.embeddings,)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: self.windows} for name in (*self.inputs, *self.outputs)}

    def input_shapes(self, windows: int) -> dict[str, tuple[int, ...]]:
        return {self.signal: self.signal_shape(windows), self.frames: (windows,)}

    def describe(self, hidden: int, embeddings_dtype: str) -> dict:
        """The I/O block of the encoder's config.json (`takes`: the input kind)."""
        w = self.windows
        return {
            "takes": self.takes,
            "inputs": {self.signal: {"dtype": self.signal_dtype, "shape": list(self.signal_shape(w))},
                       self.frames: {"dtype": self.frames_dtype, "shape": [w]}},
            "outputs": {self.embeddings: {"dtype": embeddings_dtype, "shape": [w, TOKENS_PER_WINDOW, hidden]}},
        }

    def check_names(self, inputs, outputs, where: str) -> None:
        if sorted(inputs) != sorted(self.inputs) or list(outputs) != list(self.outputs):
            raise ValueError(f"expected encoder inputs {list(self.inputs)} and outputs {list(self.outputs)} in "
                             f"{where}, got inputs {list(inputs)} and outputs {list(outputs)}")

    def check_frames(self, frames: np.ndarray) -> None:
        """Every window needs 1..3000 valid frames (0 would mask every attention key)."""
        if frames.size and (frames.min() < 1 or frames.max() > FRAMES_PER_WINDOW):
            raise ValueError(f"expected 1..{FRAMES_PER_WINDOW} valid frames per window, got {frames.tolist()}")

    def check_batch(self, signal_shape, frames_shape) -> int:
        """Validate (W, 128, 3000) features or (W, 480000) audio, and (W,) frames; returns W."""
        signal_shape, frames_shape = tuple(signal_shape), tuple(frames_shape)
        w = signal_shape[0] if signal_shape else -1
        if signal_shape != self.signal_shape(w) or frames_shape != (w,):
            want = ", ".join(("W", *(str(n) for n in self.signal_shape(w)[1:])))
            raise ValueError(f"expected {self.signal} ({want}) and frames (W,), "
                             f"got {self.signal} {signal_shape} and frames {frames_shape}")
        return w


IO = EncoderIO()


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


class OnnxRuntimeEncoder:
    """Encoder backend on the exported ONNX graph (ONNX Runtime).

    __call__(inputs, frames (W,) int) -> (W, 750, H) torch tensor on `device`, in the graph's output
    dtype unless `dtype` is given; inputs: (W,128,3000) features or, for a graph that takes audio
    (`takes`, from the graph's input names), (W, 480000) padded 16 kHz windows. providers: ONNX
    Runtime execution providers in priority order (default: CUDA then CPU for a cuda `device` where
    the CUDA provider exists, else CPU).
    """

    name = "onnxruntime"

    def __init__(self, onnx_path, providers=None, device: str | torch.device = "cpu", dtype=None,
                 threads: int | None = None):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise MissingInputError(f"expected an encoder ONNX file, got {path} (no such file)")
        self.device = torch.device(device)
        available = ort.get_available_providers()
        if providers is None:
            cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in available
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(f"expected ONNX Runtime providers among {available}, got {missing}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        outputs = self.session.get_outputs()
        self.io = IO.for_names([i.name for i in self.session.get_inputs()], [o.name for o in outputs], str(path))
        self.takes = self.io.takes
        self.hidden = int(outputs[0].shape[-1])
        self.dtype = dtype
        self.path = path

    def __call__(self, inputs, frames) -> torch.Tensor:
        io = self.io
        signal = _numpy(inputs, np.float32)
        frames = _numpy(frames, np.int64)
        empty = io.check_batch(signal.shape, frames.shape) == 0
        io.check_frames(frames)
        if empty:
            out = torch.zeros((0, TOKENS_PER_WINDOW, self.hidden), device=self.device)
        else:
            (emb,) = self.session.run([io.embeddings], {io.signal: signal, io.frames: frames})
            out = torch.from_numpy(emb).to(self.device)
        return out.to(self.dtype) if self.dtype is not None else out


def import_tensorrt(command: str | None = None):
    """`import tensorrt`, or raise MissingDependency naming what is missing (and how to finish elsewhere)."""
    try:
        import tensorrt
    except ImportError as exc:
        finish = f" Finish this step on a machine with TensorRT: {command}" if command else ""
        raise MissingDependency(
            "the TensorRT encoder needs the `tensorrt` Python package (TensorRT 10.x: `pip install "
            "tensorrt-cu12` from NVIDIA's index, or an NGC TensorRT / TensorRT-LLM container); "
            f"import failed: {exc}.{finish}"
        ) from exc
    return tensorrt


_TRT_ALIGNMENT = 256  # IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment."


def _trt_aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a fresh copy where its data pointer is not 256-byte aligned (a later chunk of `frames`, say,
    starts i * 8 bytes into the batch). The copy is made and freed on the current stream, so the caching
    allocator reuses its memory only after the enqueued inference."""
    return t if t.data_ptr() % _TRT_ALIGNMENT == 0 else t.clone(memory_format=torch.contiguous_format)


class TensorRTEncoder:
    """Encoder backend on a TensorRT plan (`encoder.plan`), run on its own CUDA stream (TensorRT's
    NvInferRuntime.h warns that enqueueing on the default stream costs extra synchronization), ordered
    after the caller's current stream and before it again: callers see stream-ordered results.

    __call__(inputs, frames (W,)) -> (W, 750, H) CUDA tensor (the plan's output dtype unless `dtype`
    is given); inputs: (W,128,3000) features or, for a plan that takes audio (`takes`, from the
    engine's input names), (W, 480000) padded 16 kHz windows. Inputs are copied to the device if
    they are not there, outputs stay on it. W above the plan's profile maximum runs in chunks. One
    inference at a time per instance.
    """

    name = "tensorrt"

    def __init__(self, plan_path, device: str | torch.device = "cuda", dtype=None):
        trt = import_tensorrt()
        path = Path(plan_path)
        if not path.is_file():
            raise MissingInputError(f"expected a TensorRT encoder plan, got {path} (no such file)")
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"expected a CUDA device for the TensorRT encoder, got {self.device} "
                             f"(torch.cuda.is_available() = {torch.cuda.is_available()})")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT {trt.__version__} could not deserialize {path}: a plan only loads "
                                   "with the TensorRT version and GPU that built it; rebuild it here")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.io = IO.for_names(inputs, [n for n in names if n not in inputs], str(path))
        self.takes = self.io.takes
        self._dtypes = {n: dtypes.dtype(self.engine.get_tensor_dtype(n)).torch for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape(self.io.signal, 0)
        self.min_windows, self.max_windows = int(lo[0]), int(hi[0])
        self.hidden = int(self.engine.get_tensor_shape(self.io.embeddings)[-1])
        self.dtype = dtype
        self.path = path
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device)

    def _run(self, signal: torch.Tensor, frames: torch.Tensor, stream: int) -> torch.Tensor:
        ctx, io = self.context, self.io
        signal, frames = _trt_aligned(signal), _trt_aligned(frames)
        for name, t in ((io.signal, signal), (io.frames, frames)):
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"expected {name} within the plan's profile ({self.min_windows}..{self.max_windows}"
                                 f" windows), got shape {tuple(t.shape)}")
        out = torch.empty(tuple(ctx.get_tensor_shape(io.embeddings)), dtype=self._dtypes[io.embeddings],
                          device=self.device)
        for name, t in ((io.signal, signal), (io.frames, frames), (io.embeddings, out)):
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name} ({t.data_ptr():#x}) on {self.path}")
        if not ctx.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {tuple(signal.shape)} {io.signal} on {self.path}")
        return out

    def __call__(self, inputs, frames) -> torch.Tensor:
        io = self.io
        io.check_frames(np.asarray(torch.as_tensor(frames).cpu()))  # as the ONNX Runtime encoder: 1..3000 each
        signal = torch.as_tensor(inputs).to(self.device, self._dtypes[io.signal]).contiguous()
        frames = torch.as_tensor(frames).to(self.device, self._dtypes[io.frames]).contiguous()
        w = io.check_batch(signal.shape, frames.shape)
        with self._lock, torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)  # inputs were written on the caller's stream
            for t in (signal, frames):
                t.record_stream(self._stream)  # not reused by the allocator before the plan read them
            with torch.cuda.stream(self._stream):
                outs = self._chunks(signal, frames, w, self._stream.cuda_stream)
            caller.wait_stream(self._stream)
            for t in outs:
                t.record_stream(caller)
        out = torch.cat(outs) if outs else torch.zeros((0, TOKENS_PER_WINDOW, self.hidden), device=self.device)
        return out.to(self.dtype) if self.dtype is not None else out

    def _chunks(self, signal, frames, w: int, stream: int) -> list[torch.Tensor]:
        """Windows in chunks of the plan's profile maximum, on `stream` (the current one here)."""
        outs = []
        for i in range(0, w, self.max_windows):
            f, n = signal[i : i + self.max_windows], frames[i : i + self.max_windows]
            real = f.shape[0]
            if real < self.min_windows:  # a profile with min > 1: pad with copies of the last window
                f = torch.cat([f, f[-1:].expand(self.min_windows - real, *f.shape[1:])]).contiguous()
                n = torch.cat([n, n[-1:].expand(self.min_windows - real)]).contiguous()
            outs.append(self._run(f, n, stream)[:real])
        return outs


def encoder_dir(path) -> Path:
    """ENGINE_DIR/encoder for an engine dir, or `path` itself when it already is the encoder folder."""
    path = Path(path)
    return path / ENCODER_DIR if (path / ENCODER_DIR).is_dir() else path


def available_encoders(engine_dir) -> list[str]:
    """Encoder backends usable for `engine_dir`, best first: tensorrt (plan + tensorrt + CUDA),
    onnxruntime (encoder.onnx + onnxruntime), torch (needs the checkpoint's weights; always listed)."""
    if not isinstance(engine_dir, (str, Path)):  # a Checkpoint: weights only
        return ["torch"]
    d = encoder_dir(engine_dir)
    out = []
    if (d / PLAN_FILE).is_file() and importlib.util.find_spec("tensorrt") and torch.cuda.is_available():
        out.append("tensorrt")
    if (d / ONNX_FILE).is_file() and importlib.util.find_spec("onnxruntime"):
        out.append("onnxruntime")
    return out + ["torch"]


def _load_torch(path, device, dtype):
    ckpt = path if isinstance(path, Checkpoint) else None
    if ckpt is None:
        try:
            ckpt = Checkpoint.open(path)
        except FileNotFoundError as exc:
            raise MissingInputError(f"the torch encoder needs the AF3 checkpoint (safetensors): {exc}") from exc
    return TorchEncoder.from_checkpoint(ckpt, device, dtype or torch.float32)


def _engine_file(path, name: str) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"expected an engine dir path for this encoder backend, got {type(path).__name__}")
    return encoder_dir(path) / name


_LOADERS = {
    "tensorrt": lambda path, device, dtype: TensorRTEncoder(_engine_file(path, PLAN_FILE), device, dtype),
    "onnxruntime": lambda path, device, dtype: OnnxRuntimeEncoder(_engine_file(path, ONNX_FILE), device=device,
                                                                  dtype=dtype),
    "torch": _load_torch,
}


def load_encoder(name: str, engine_dir_or_checkpoint, device: str | torch.device = "cpu", dtype=None):
    """Encoder backend `name` ("auto" = the first of available_encoders) for an engine dir (tensorrt,
    onnxruntime) or an AF3 checkpoint dir / `Checkpoint` (torch). dtype: output dtype (torch: the
    module's dtype, default float32); None keeps the graph's."""
    if name == "auto":
        name = available_encoders(engine_dir_or_checkpoint)[0]
    if name not in _LOADERS:
        raise OptionError(f"expected encoder backend in {['auto', *_LOADERS]}, got {name!r}")
    return _LOADERS[name](engine_dir_or_checkpoint, torch.device(device), dtype)
