"""The encoder's I/O contract and its config.json: what build/encoder*.py write and runtime/encoder.py reads.

File names of ENGINE_DIR/encoder/, the graph's tensor names, dtypes and dynamic axis (`EncoderIO`), and
encoder/config.json (sections io, onnx, quantized, plan). Torch-free; onnx only inside `external_data_files`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .. import fileio
from ..spec import FRAMES_PER_WINDOW, N_MELS, TOKENS_PER_WINDOW, WINDOW_SAMPLES

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

    def check_frames(self, frames) -> None:
        """Every window needs 1..3000 valid frames (0 would mask every attention key); frames: numpy."""
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


def encoder_dir(path) -> Path:
    """ENGINE_DIR/encoder for an engine dir, or `path` itself when it already is the encoder folder."""
    path = Path(path)
    return path / ENCODER_DIR if (path / ENCODER_DIR).is_dir() else path


FRONT_END_SCOPE = "/logmel/"  # ONNX node names of AudioInputEncoder.logmel (the exporter's module scope)

# -- config.json ------------------------------------------------------------------------------------

CONFIG_FORMAT = "af3trt-encoder"
CONFIG_VERSION = 1
_CONFIG_KEYS = frozenset({"format", "format_version", "io", "onnx", "quantized", "plan"})


def read_config(folder) -> dict:
    """encoder/config.json, strictly: our format and version, known sections only."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"expected an encoder config at {path}, found none")
    data = json.loads(path.read_text())
    if data.get("format") != CONFIG_FORMAT or data.get("format_version") != CONFIG_VERSION:
        raise ValueError(f"expected {CONFIG_FORMAT!r} version {CONFIG_VERSION} in {path}, "
                         f"got {data.get('format')!r} version {data.get('format_version')!r}")
    unknown = set(data) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in {path}; expected only {sorted(_CONFIG_KEYS)}")
    return data


def update_config(folder: Path, **sections) -> Path:
    path = Path(folder) / CONFIG_FILE
    data = read_config(folder) if path.is_file() else {"format": CONFIG_FORMAT, "format_version": CONFIG_VERSION}
    data.update(sections)
    fileio.atomic_write(path, json.dumps(data, indent=2, sort_keys=True))
    return path


def matching_section(folder: Path, section: str, key: str, artifact: str) -> dict | None:
    """config.json's `section` of `folder` when it was written for `key` and `artifact` is there, else None."""
    try:
        found = read_config(folder).get(section) or {}
    except (FileNotFoundError, ValueError):
        return None
    return found if found.get("key") == key and (folder / artifact).is_file() else None


def external_data_files(onnx_path) -> list[str]:
    """Names of the external-data files an ONNX graph references (relative to its folder)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return sorted(locations)
