"""TensorRT plan of the encoder graph: ONNX (float or Q/DQ) -> ENGINE_DIR/encoder/encoder.plan.

The TensorRT 10.x Python API (checked against the TensorRT 10.13 bindings, python/src/*.cpp of
NVIDIA/TensorRT release/10.13, the TensorRT that TensorRT-LLM 1.2 pins: `tensorrt~=10.13.3`): Builder,
a network from `OnnxParser.parse_from_file` (external weights resolve beside the .onnx file; every
parser error collected and raised), one optimization profile over the window axis of `features` (or
`audio`)/`frames`, a timing cache loaded and saved, `build_serialized_network` returning None
raises. A Q/DQ graph (quantize_onnx), an fp16 graph or an fp32 plan builds strongly typed (no type
BuilderFlag: those are not allowed there); a float32 graph for an fp16/bf16 plan builds weakly typed
with the precision's BuilderFlag (deprecated since TensorRT 10.12, still honoured in 10.x). A graph
that takes audio keeps its log-mel front end (the conv STFT) in true FP32: TF32 cleared and, in a
weakly typed build, its layers pinned to float32 (af3trt.kernels.logmel explains why). `tensorrt` is
imported only here and lazily: where it is missing, `build_plan` raises MissingDependency with the
CLI line that finishes the step elsewhere. The build reports its phases through a
`trt.IProgressMonitor` (`IBuilderConfig.progress_monitor`, TensorRT >= 10: phase_start(phase_name,
parent_phase, num_steps), step_complete(phase_name, step) -> bool, phase_finish(phase_name)), drawn
by `BuildProgress`.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from .. import fileio
from ..errors import lookup
from ..formats.encoder_io import (CONFIG_FILE, FRONT_END_SCOPE, IO, PLAN_FILE, EncoderIO, external_data_files,
                                  matching_section, read_config, update_config)
from ..formats.manifest import stage_key
from ..runtime.encoder import import_tensorrt
from ..spec import MAX_WINDOWS
from .stage_log import clock, terminal


class PlanBuildError(RuntimeError):
    """TensorRT rejected the graph or failed to build the plan."""


@dataclass(frozen=True)
class PlanPrecision:
    """TensorRT plan precision: `flag` = BuilderFlag for a weakly typed float build; `qdq` = the Q/DQ
    kind the graph must carry (strongly typed build)."""

    name: str
    description: str
    flag: str | None = None
    qdq: str | None = None


PLAN_PRECISIONS = MappingProxyType({
    "fp32": PlanPrecision("fp32", "float32 (reference/debugging)"),
    "fp16": PlanPrecision("fp16", "float16 compute, float32 I/O (or an fp16 graph, strongly typed)", flag="FP16"),
    "bf16": PlanPrecision("bf16", "bfloat16 compute, float32 I/O", flag="BF16"),
    "int8": PlanPrecision("int8", "INT8 Q/DQ graph from quantize_onnx, strongly typed", qdq="int8"),
    "fp8": PlanPrecision("fp8", "FP8 Q/DQ graph from quantize_onnx, strongly typed (SM89+)", qdq="fp8"),
})


@dataclass(frozen=True)
class PlanResult:
    plan_path: Path
    config_path: Path
    precision: str
    profile: tuple[int, int, int]
    strongly_typed: bool
    tensorrt_version: str
    seconds: float
    skipped: bool = False


@dataclass(frozen=True)
class GraphFacts:
    """What build_plan needs of an encoder ONNX: Q/DQ kind (None, int8, fp8), output dtype, hidden,
    and the input kind it takes ("features" | "audio", from its input names)."""

    qdq: str | None
    embeddings_dtype: str
    hidden: int
    takes: str = "features"

    @property
    def io(self) -> EncoderIO:
        return IO.for_input(self.takes)


_ONNX_FP8 = {17, 18, 19, 20}  # TensorProto FLOAT8E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ


def graph_facts(onnx_path) -> GraphFacts:
    """Inspect the graph (without its external weights) for its I/O, Q/DQ kind and output dtype."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    inits = {t.name: t.data_type for t in g.initializer}
    consts = {n.output[0]: a.t.data_type for n in g.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    io = IO.for_names([i.name for i in g.input if i.name not in inits], [o.name for o in g.output], str(onnx_path))
    kinds = set()
    for node in g.node:
        if node.op_type == "QuantizeLinear":
            zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
            kinds.add("fp8" if (inits.get(zero) or consts.get(zero)) in _ONNX_FP8 else "int8")
    if len(kinds) > 1:
        raise ValueError(f"expected one Q/DQ kind in {onnx_path}, got {sorted(kinds)}")
    out = next(o for o in g.output if o.name == IO.embeddings)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).name
    hidden = out.type.tensor_type.shape.dim[-1].dim_value
    return GraphFacts(kinds.pop() if kinds else None, dtype, int(hidden), io.takes)


def _strongly_typed(spec: PlanPrecision, facts: GraphFacts, path: Path) -> bool:
    """Q/DQ or reduced-precision graphs carry their types (strongly typed); an fp32 graph takes a flag."""
    if facts.qdq or spec.qdq:
        if facts.qdq != spec.qdq:
            got = f"an {facts.qdq} Q/DQ graph" if facts.qdq else "a float graph without Q/DQ"
            want = f"an {spec.qdq} Q/DQ graph (quantize_onnx(precision={spec.qdq!r}))" if spec.qdq else "a float graph"
            raise ValueError(f"plan precision {spec.name!r} needs {want}, got {got}: {path}")
        return True
    if facts.embeddings_dtype == "float16":
        if spec.name != "fp16":
            raise ValueError(f"plan precision {spec.name!r} needs a float32 graph, got a float16 graph: {path}")
        return True
    return spec.flag is None


def _profile(profile, src: Path) -> tuple[int, int, int]:
    if profile is None:
        try:
            top = int((read_config(src.parent).get("onnx") or {}).get("max_windows", MAX_WINDOWS))
        except (FileNotFoundError, ValueError):
            top = MAX_WINDOWS
        return 1, min(4, top), top
    lo, opt, hi = (int(v) for v in profile)
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"expected a windows profile 1 <= min <= opt <= max, got {tuple(profile)}")
    return lo, opt, hi


def plan_command(onnx_path, out_dir, precision: str, profile, timing_cache=None, workspace_gib=None) -> str:
    """The CLI line that runs build_plan with these arguments (printed where TensorRT is missing)."""
    cmd = (f"python -m af3trt.build.encoder plan --onnx {shlex.quote(str(onnx_path))} --out "
           f"{shlex.quote(str(out_dir))} --precision {precision} --profile {' '.join(str(v) for v in profile)}")
    if timing_cache:
        cmd += f" --timing-cache {shlex.quote(str(timing_cache))}"
    if workspace_gib:
        cmd += f" --workspace-gib {workspace_gib}"
    return cmd


def _trt_logger(trt):
    class Logger(trt.ILogger):
        """Keeps TensorRT's error messages for the exception; prints warnings and worse."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = getattr(severity, "name", str(severity))
            if level in ("INTERNAL_ERROR", "ERROR"):
                self.errors.append(msg)
            if level in ("INTERNAL_ERROR", "ERROR", "WARNING"):
                print(f"[TensorRT {level}] {msg}", file=sys.stderr)

    return Logger()


def _parse_network(trt, builder, logger, src: Path, strongly_typed: bool, io: EncoderIO):
    # TensorRT 10 networks are always explicit batch (EXPLICIT_BATCH is deprecated and ignored): 0 = weakly typed.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file takes a str (not a Path); external data `location`s resolve against its folder.
    ok = parser.parse_from_file(str(src.resolve()))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        listed = "\n".join(f"  {e}" for e in errors) or "  (the parser recorded no error)"
        raise PlanBuildError(f"TensorRT {trt.__version__}'s ONNX parser rejected {src} with {len(errors)} error(s):\n"
                             f"{listed}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    io.check_names(inputs, outputs, f"the TensorRT network parsed from {src}")
    return network, parser  # the parser owns the weights: keep it alive until the build ends


def _builder_config(trt, builder, spec: PlanPrecision, strongly_typed: bool, profile, cache: bytes,
                    workspace_gib: float | None, io: EncoderIO):
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:
        flag = getattr(trt.BuilderFlag, spec.flag, None)
        if flag is None:
            raise PlanBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{spec.flag} (weak typing removed): "
                                 f"export the ONNX with dtype='fp16' for an fp16 plan")
        config.set_flag(flag)
    shapes = [io.input_shapes(w) for w in profile]
    opt = builder.create_optimization_profile()
    for name in io.inputs:
        opt.set_shape(name, *(s[name] for s in shapes))
    if config.add_optimization_profile(opt) < 0:
        raise PlanBuildError(f"TensorRT rejected the optimization profile {profile} windows for {list(io.inputs)}")
    # b"" = a fresh cache. An unreadable blob: TensorRT logs an ERROR ("The timing cache will not be used!") and
    # may hand back no cache (None from the bindings' nullptr): refuse that rather than pass None on.
    timing_cache = config.create_timing_cache(cache)
    if timing_cache is None or not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        raise PlanBuildError("TensorRT rejected the timing cache (unreadable, or made by another TensorRT or GPU): "
                             "delete it or pass another --timing-cache path")
    return config


def _keep_front_end_fp32(trt, network, config, strongly_typed: bool, src: Path) -> None:
    """Keep an audio-input graph's log-mel front end (the FRONT_END_SCOPE layers: DFT conv, power,
    mel matmul, log) in true FP32: TF32 off (its 10-bit mantissa costs ~4e-4 on the log-mel), and in a
    weakly typed build its float layers pinned to float32 under OBEY_PRECISION_CONSTRAINTS, or FP16
    could take them (and |X|^2 can pass fp16's 65504). A strongly typed build obeys the graph's
    float32 types already."""
    config.clear_flag(trt.BuilderFlag.TF32)  # honoured in strongly typed builds too (float32 math)
    if strongly_typed:
        return  # strongly typed networks reject layer.precision / set_output_type
    pinned = 0
    with warnings.catch_warnings():  # both setters are deprecated since TensorRT 10.12, still honoured in 10.x
        warnings.simplefilter("ignore", DeprecationWarning)
        for layer in (network.get_layer(i) for i in range(network.num_layers)):
            outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
            if layer.name.startswith(FRONT_END_SCOPE) and all(t.dtype == trt.float32 for t in outputs):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
    if not pinned:
        raise PlanBuildError(f"expected the log-mel front end's layers (names starting {FRONT_END_SCOPE!r}) in "
                             f"the audio-input network parsed from {src}, found none")
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)


class BuildProgress:
    """TensorRT's build phases as progress bars named `stage: PHASE` (steps done, elapsed, and the
    ETA tqdm draws from the phase's step rate), a `done in T` line per top-level phase: the logic of
    the IProgressMonitor `_progress_monitor` gives TensorRT (its three callbacks). TensorRT calls it
    from its own threads: one lock. Phases deeper than `max_depth` count in their parent's time only.
    The callbacks cannot raise into TensorRT (noexcept C++): Ctrl-C sets `cancelled`, and the next
    `step_complete` returns False, which cancels the build; any other error stops the display with a
    line saying so, and the build goes on."""

    def __init__(self, stage: str = "encoder_plan", file=None, max_depth: int = 1, mininterval: float = 0.5):
        self.stage, self.file, self.max_depth, self.mininterval = stage, file, max_depth, mininterval
        self.cancelled = False
        self.failed: BaseException | None = None
        self._phases: dict[str, tuple[int, object, float]] = {}  # name -> (depth, bar, start)
        self._lock = threading.Lock()

    def _out(self):
        return self.file or terminal()

    def _guard(self, fn, *args, cancel_value=None):
        if self.failed is not None:
            return cancel_value
        try:
            with self._lock:
                return fn(*args)
        except KeyboardInterrupt:
            self.cancelled = True
        except Exception as exc:  # a display bug must not end TensorRT's process (noexcept callbacks)
            self.failed = exc
            print(f"{self.stage}: progress display stopped ({type(exc).__name__}: {exc}); the build goes on",
                  file=self._out(), flush=True)
        return cancel_value

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self._guard(self._start, phase_name, parent_phase, num_steps)

    def step_complete(self, phase_name: str, step: int) -> bool:
        """step: the index of the step just done, in [0, num_steps). False asks TensorRT to cancel."""
        self._guard(self._step, phase_name, step)
        return not self.cancelled

    def phase_finish(self, phase_name: str) -> None:
        self._guard(self._finish, phase_name)

    def close(self) -> None:
        """Close the bars of phases TensorRT left open (a failed or cancelled build)."""
        with self._lock:
            for _, bar, _ in self._phases.values():
                if bar is not None:
                    bar.close()
            self._phases.clear()

    def _start(self, name, parent, steps):
        depth = self._phases[parent][0] + 1 if parent in self._phases else 0
        bar = None
        if depth <= self.max_depth:
            from tqdm import tqdm

            bar = tqdm(total=max(int(steps), 1), desc=f"{self.stage}: {name}", unit="step", file=self._out(),
                       leave=False, position=depth, mininterval=self.mininterval)
        self._phases[name] = (depth, bar, time.perf_counter())

    def _step(self, name, step):
        entry = self._phases.get(name)
        if entry is not None and entry[1] is not None:
            entry[1].update(int(step) + 1 - entry[1].n)

    def _finish(self, name):
        entry = self._phases.pop(name, None)
        if entry is None:
            return
        depth, bar, start = entry
        if bar is not None:
            bar.close()
        if depth == 0:
            print(f"{self.stage}: {name}: done in {clock(time.perf_counter() - start)}", file=self._out(), flush=True)


def _progress_monitor(trt, progress: BuildProgress):
    """A trt.IProgressMonitor (TensorRT >= 10: `IBuilderConfig.progress_monitor`) handing its three
    callbacks to `progress`. It must outlive the build: build_plan holds it until the plan is built."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return Monitor()


def _onnx_fingerprint(path: Path) -> str:
    """Hash of the graph file and of its external weights (size + first/last MiB, like checkpoints)."""
    h = hashlib.sha256(path.read_bytes())
    for name in external_data_files(path):
        data = path.parent / name
        size = data.stat().st_size
        h.update(f"{name}:{size}".encode())
        with open(data, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def build_plan(onnx_path, out_dir=None, *, precision: str = "fp16", profile=None, timing_cache=None,
               workspace_gib: float | None = None, force: bool = False) -> PlanResult:
    """Build OUT_DIR/encoder.plan (default: the ONNX's folder) with TensorRT's Python API.

    precision: fp16 | bf16 | fp32 on a float graph; int8 | fp8 on a quantize_onnx Q/DQ graph
    (strongly typed). profile: (min, opt, max) windows, default (1, 4, the export's max_windows).
    timing_cache: file loaded if present and saved after the build. Raises MissingDependency (with
    the CLI line to run elsewhere) without tensorrt, PlanBuildError on any parser or build error.
    """
    spec = lookup(PLAN_PRECISIONS, precision, "plan precision")
    src = Path(onnx_path)
    if not src.is_file():
        raise FileNotFoundError(f"expected an encoder ONNX file, got {src} (no such file)")
    out = Path(out_dir) if out_dir else src.parent
    facts = graph_facts(src)
    strongly_typed = _strongly_typed(spec, facts, src)
    prof = _profile(profile, src)
    trt = import_tensorrt(plan_command(src, out, precision, prof, timing_cache, workspace_gib))
    key = stage_key(onnx=_onnx_fingerprint(src), precision=precision, profile=prof, tensorrt=trt.__version__)
    if not force and (done := _existing_plan(out, key)) is not None:
        return done
    t0 = time.perf_counter()
    cache_path = Path(timing_cache) if timing_cache else None
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse_network(trt, builder, logger, src, strongly_typed, facts.io)
    cache = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config = _builder_config(trt, builder, spec, strongly_typed, prof, cache, workspace_gib, facts.io)
    if facts.takes == "audio":
        _keep_front_end_fp32(trt, network, config, strongly_typed, src)
    progress = BuildProgress()
    config.progress_monitor = monitor = _progress_monitor(trt, progress)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        progress.close()
    del monitor  # held until here: TensorRT calls it during the build
    if progress.cancelled:
        raise KeyboardInterrupt(f"the TensorRT build of {src} was cancelled")
    if serialized is None:
        raise PlanBuildError(f"TensorRT {trt.__version__} failed to build the {precision} plan from {src} "
                             f"(build_serialized_network returned None): {logger.errors or 'no error logged'}")
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write(out / PLAN_FILE, serialized)
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fileio.atomic_write(cache_path, config.get_timing_cache().serialize())
    seconds = time.perf_counter() - t0
    io = {network.get_input(i).name: network.get_input(i).dtype.name for i in range(network.num_inputs)}
    io.update({network.get_output(i).name: network.get_output(i).dtype.name for i in range(network.num_outputs)})
    config_path = update_config(out, plan={
        "file": PLAN_FILE, "onnx": src.name if src.parent.resolve() == out.resolve() else str(src),
        "key": key, "precision": precision, "strongly_typed": strongly_typed,
        "profile": dict(zip(("min", "opt", "max"), prof)), "io": io, "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "timing_cache": str(cache_path) if cache_path else None, "build_seconds": round(seconds, 1)})
    return PlanResult(out / PLAN_FILE, config_path, precision, prof, strongly_typed, trt.__version__, seconds)


def _existing_plan(out: Path, key: str) -> PlanResult | None:
    plan = matching_section(out, "plan", key, PLAN_FILE)
    if plan is None:
        return None
    prof = tuple(plan["profile"][k] for k in ("min", "opt", "max"))
    return PlanResult(out / PLAN_FILE, out / CONFIG_FILE, plan["precision"], prof, plan["strongly_typed"],
                      plan["tensorrt"], 0.0, skipped=True)
