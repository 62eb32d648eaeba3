"""Latency backends: each way of running AF3, timed the same way (`Backend.run` -> `Call`).

Registry `BACKENDS` (name -> class). A backend that cannot run here says why in `unavailable()`
and the benchmark records "skipped: <reason>"; nothing is ever estimated in its place.

- `torch`       af3trt Pipeline, torch encoder + torch decoder (eager; bf16 on GPU)
- `torch-fast`  af3trt Pipeline with the FastTorchDecoder (CUDA-graph decode, GEMV kernels), when present
- `torch-fp8`   the same with weight-only FP8 linears (quantized from the bf16 weights), when present
- `hf`          transformers' AF3 `generate`, SDPA, dynamic cache (the eager reference)
- `hf-compiled` transformers' AF3 `generate` with a static cache, which makes transformers compile the
                decode step (CUDA only; the first call compiles)
- `trtllm`      af3trt Pipeline on an engine dir with the TensorRT-LLM decoder
- `triton`      a running Triton server on an af3trt repository (Af3Client, gRPC streaming, MIN_TOKENS =
                MAX_TOKENS): client-side end-to-end time and time to the first text piece
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..audio import synthetic_audio
from ..dtypes import DTYPES
from ..errors import OptionError
from ..formats.manifest import MANIFEST, Manifest
from ..formats.precision import get_kv_cache, get_precision
from ..kernels import gemv
from ..prompt import DEFAULT_TRANSCRIBE_PROMPT
from ..runtime import fast_weights as fast_weights_module
from ..runtime import fast_decoder as fast_decoder_module
from ..runtime.pipeline import Pipeline
from ..serving.client import Af3Client
from .random_model import hf_available


@dataclass
class Call:
    """One timed generate call of a batch, in seconds (None: the backend cannot see that stage).

    features: audio -> log-mel (and tokenization); encoder: encoder + projector; prefill: the LM
    forward over the prompt up to the first token; decode: first token -> last token; ttft: call
    start -> first token; total: call start -> all tokens.
    """

    total: float
    features: float | None = None
    encoder: float | None = None
    prefill: float | None = None
    decode: float | None = None
    ttft: float | None = None
    new_tokens: int = 0


def sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conversation(audio) -> list[dict]:
    """One single-turn transcription request on `audio` (16 kHz samples, path or bytes)."""
    return [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                         {"type": "text", "text": DEFAULT_TRANSCRIBE_PROMPT}]}]


def conversations(seconds: float, batch: int, seed: int = 0) -> list[list[dict]]:
    """`batch` transcription requests on different synthetic clips of equal length (seeds seed..)."""
    return [conversation(synthetic_audio(seconds, seed + i)) for i in range(batch)]


class Backend:
    """Base: `unavailable()` -> reason or None; `setup()` once; `run(convs, new_tokens)` -> Call."""

    name = ""
    precision = "bf16"
    description = ""

    def __init__(self, models):
        self.models = models

    def unavailable(self) -> str | None:
        return None

    def setup(self) -> None:
        pass

    def close(self) -> None:
        """Release what setup built (called after the backend's last row)."""


class TorchBackend(Backend):
    name = "torch"
    description = "af3trt Pipeline: torch encoder + torch decoder (eager, static KV cache)"

    def setup(self) -> None:
        self.pipe = self.models.pipeline()
        self.precision = _precision_name(self.pipe.decoder)

    def run(self, convs, new_tokens: int) -> Call:
        results = self.pipe.generate(convs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     repetition_penalty=1.0)  # the hf backend's options
        got = {len(r.token_ids) for r in results}
        if got != {new_tokens}:
            raise RuntimeError(f"expected {new_tokens} new tokens per request, got {sorted(got)}")
        t = results[0].timings
        return Call(total=t["total"], features=t["features"], encoder=t["encoder"], prefill=t["prefill"],
                    decode=t["decode"], ttft=t["ttft"], new_tokens=new_tokens)


_FP8_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def fast_unavailable(fp8: bool = False) -> str | None:
    """None when af3trt has the fast torch decoder (and, with fp8, its FP8 weights), else why not."""
    needs = [(fast_decoder_module, "FastTorchDecoder"), (fast_weights_module, "fast_weights")]
    needs += [(gemv, "quantize_fp8_weight")] if fp8 else []
    missing = [f"{m.__name__}.{name}" for m, name in needs if not hasattr(m, name)]
    if missing:
        return f"not available: af3trt lacks {missing}"
    if fp8 and not hasattr(torch, "float8_e4m3fn"):
        return f"not available: torch {torch.__version__} has no float8_e4m3fn"
    return None


def fast_decoder(decoder, *, fp8: bool = False):
    """FastTorchDecoder on the weights of a TorchDecoder: bf16 (fused copies of q/k/v and gate/up), or
    weight-only FP8 (per-tensor scales, lm_head kept in the model dtype as ModelOpt's FP8 export does)."""
    module = decoder.module
    if not fp8:
        return fast_decoder_module.FastTorchDecoder.from_module(module, decoder.device)
    state = {k: v.detach() for k, v in module.state_dict().items()}
    scales = {}
    for name in [n for n in state if _FP8_LINEAR.fullmatch(n)]:
        state[name], scales[name] = gemv.quantize_fp8_weight(state[name])
    weights = fast_weights_module.fast_weights(module.t, state, scales, decoder.device, decoder.dtype)
    return fast_decoder_module.FastTorchDecoder(weights, decoder.device)


def with_decoder(pipe, decoder):
    """The same Pipeline (builder, encoder, spec) with another decoder; encoder cache off."""
    return Pipeline(pipe.builder, pipe.encoder, decoder, pipe.spec, pipe.defaults, pipe.device, cache_bytes=0)


class TorchFastBackend(TorchBackend):
    name = "torch-fast"
    description = "af3trt Pipeline: torch encoder + FastTorchDecoder (static cache, CUDA-graph decode, GEMV kernels)"
    fp8 = False

    def unavailable(self) -> str | None:
        return fast_unavailable(self.fp8)

    def setup(self) -> None:
        base = self.models.pipeline()
        self.pipe = with_decoder(base, fast_decoder(base.decoder, fp8=self.fp8))
        if not self.fp8:
            self.precision = _precision_name(base.decoder)

    def close(self) -> None:
        self.pipe = None  # the fast weights and static KV cache go; the shared model stays


class TorchFP8Backend(TorchFastBackend):
    name = "torch-fp8"
    precision = "fp8"
    description = "af3trt Pipeline: torch encoder + FastTorchDecoder with weight-only FP8 linears"
    fp8 = True


class _TokenClock:
    """transformers streamer that stamps the wall time of each `put` (the first put is the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())  # put receives CPU tokens: the device step is done

    def end(self) -> None:
        pass


class HFBackend(Backend):
    name = "hf"
    description = "transformers AF3 generate: SDPA, dynamic cache, eager"
    generate_kwargs: dict = {}

    def unavailable(self) -> str | None:
        return hf_available()

    def setup(self) -> None:
        self.model, self.processor = self.models.hf()
        self.device = self.model.device
        self.precision = _DTYPE_NAMES.get(self.model.dtype, str(self.model.dtype))

    def _inputs(self, convs):
        inputs = self.processor.apply_chat_template(convs, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)
        inputs = inputs.to(self.device)
        if "input_features" in inputs:
            inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
        return inputs

    @torch.no_grad()  # as transformers' generate itself runs
    def _encoder_seconds(self, inputs) -> float:
        if "input_features" not in inputs:
            return 0.0
        sync(self.device)
        t0 = time.perf_counter()
        self.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
        sync(self.device)
        return time.perf_counter() - t0

    def run(self, convs, new_tokens: int) -> Call:
        t0 = time.perf_counter()
        inputs = self._inputs(convs)
        sync(self.device)
        t1 = time.perf_counter()
        clock = _TokenClock()
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, repetition_penalty=1.0, streamer=clock,
                                      **self.generate_kwargs)
        sync(self.device)
        t2 = time.perf_counter()
        got = out.shape[1] - inputs["input_ids"].shape[1]
        if got != new_tokens or len(clock.stamps) < 2:
            raise RuntimeError(f"expected {new_tokens} new tokens and a streamed first token, got {got} tokens, "
                               f"{len(clock.stamps)} streamer calls")
        first = clock.stamps[1]
        encoder = self._encoder_seconds(inputs)  # a separate call on the same inputs
        return Call(total=t2 - t0, features=t1 - t0, encoder=encoder, prefill=max(0.0, first - t1 - encoder),
                    decode=t2 - first, ttft=first - t0, new_tokens=new_tokens)


class HFCompiledBackend(HFBackend):
    name = "hf-compiled"
    description = "transformers AF3 generate: static cache + torch.compile'd decode step (auto-compile)"
    generate_kwargs = {"cache_implementation": "static"}

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason is None and torch.device(self.models.device).type != "cuda":
            reason = "needs CUDA (transformers compiles the static-cache decode step only on GPU)"
        return reason


class TrtllmBackend(TorchBackend):
    name = "trtllm"
    precision = "engine"
    description = "af3trt Pipeline on an engine dir: TensorRT-LLM decoder (+ the dir's best encoder)"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("tensorrt_llm") is None:
            return "tensorrt_llm is not installed (NVIDIA containers / index only)"
        if not self.models.engine_dir:
            return "no engine dir given (--engine-dir)"
        if not (Path(self.models.engine_dir) / MANIFEST).is_file():
            return f"{self.models.engine_dir} is not an af3trt engine dir (no manifest.json)"
        return None

    def setup(self) -> None:
        self.pipe = Pipeline.from_pretrained(self.models.engine_dir, decoder="tensorrt_llm", device=self.models.device,
                                             cache_bytes=0)
        self.precision, self.kv_precision = engine_labels(Manifest.read(self.models.engine_dir))


# The af3trt repository's request (af3trt.build.triton.REQUEST_INPUTS of `af3` / `ensemble`) that
# this backend sends through Af3Client: encoded audio files, the prompt, the output length (MIN_TOKENS =
# MAX_TOKENS, so it is fixed as in the other backends), streaming; the answer comes back as TEXT pieces.
TRITON_INPUTS = ("PROMPT", "AUDIO", "MAX_TOKENS", "MIN_TOKENS", "STREAM")


def triton_grpc_url(http_url: str, grpc_url: str | None = None) -> str:
    """The gRPC host:port: `grpc_url` when given, else the HTTP host with port + 1 (Triton's default layout)."""
    if grpc_url:
        return grpc_url
    host, sep, port = http_url.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise OptionError(f"expected the Triton HTTP URL as host:port, got {http_url!r}")
    return f"{host}:{int(port) + 1}"


def request_parts(conv) -> tuple[str, list]:
    """(prompt text, audios in order) of a single-turn conversation, as Af3Client takes them."""
    (turn,) = conv
    audios = [it["audio"] for it in turn["content"] if it["type"] == "audio"]
    return "".join(it["text"] for it in turn["content"] if it["type"] == "text"), audios


def _stream_one(client, inputs, model: str, stamps: list, errors: dict, index: int) -> None:
    """Thread body: stream one request, stamping the arrival of every non-empty TEXT piece, then the end."""
    try:
        for piece in client.stream_inputs(inputs, model=model):
            if piece:
                stamps.append(time.perf_counter())
        stamps.append(time.perf_counter())
    except Exception as exc:  # reported by run(), with the request it belongs to
        errors[index] = exc


class TritonBackend(Backend):
    name = "triton"
    precision = "server"
    description = ("Triton server (af3trt repository) via Af3Client over gRPC: one streamed request per "
                   "conversation, all sent together, MIN_TOKENS = MAX_TOKENS; client-side times (TTFT = first "
                   "text piece)")

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("tritonclient") is None:
            return "tritonclient is not installed (pip install 'af3trt[triton]')"
        url, model = self.models.triton_url, self.models.triton_model
        if not url:
            return "no server URL given (--triton-url)"
        try:
            names = self._probe(url, model)
        except Exception as exc:  # a probe: any failure to talk to the server is the reason to skip
            return f"server at {url} not usable: {type(exc).__name__}: {exc}"
        if isinstance(names, str):
            return names
        missing = [n for n in TRITON_INPUTS if n not in names]
        return f"expected model {model!r} to take inputs {list(TRITON_INPUTS)}, got {sorted(names)}" if missing else None

    def _probe(self, url: str, model: str):
        """The model's input names over HTTP, or why the server or its gRPC endpoint cannot be used."""
        import tritonclient.grpc as grpc
        import tritonclient.http as http

        grpc_url = triton_grpc_url(url, self.models.triton_grpc_url)
        client, stream_client = http.InferenceServerClient(url), grpc.InferenceServerClient(grpc_url)
        try:
            if not client.is_server_live():
                return f"server at {url} is not live"
            if not client.is_model_ready(model):
                return f"model {model!r} is not ready on {url}"
            if not stream_client.is_server_live():
                return f"gRPC endpoint {grpc_url} is not live (--triton-grpc-url)"
            self.decoupled = bool(client.get_model_config(model).get("model_transaction_policy", {}).get("decoupled"))
            self.description = f"{type(self).description}; the server runs {self._served(client)}"
            return {i["name"] for i in client.get_model_metadata(model)["inputs"]}
        finally:
            client.close()
            stream_client.close()

    @staticmethod
    def _served(client) -> str:
        """What the server's repository runs (its LLM and encoder models' configs), not the client's --model."""
        def describe(name: str) -> str:
            cfg = client.get_model_config(name)
            params = {k: v.get("string_value") for k, v in (cfg.get("parameters") or {}).items()}
            kind = cfg.get("platform") or cfg.get("backend")
            where = params.get("gpt_model_path") or params.get("path")
            inner = params.get("backend")  # the python encoder's onnxruntime | torch
            return f"{name}: {kind}" + (f" ({inner})" if inner else "") + (f" on {where}" if where else "")

        names = {m["name"] for m in client.get_model_repository_index()}
        known = [n for n in ("tensorrt_llm", "audio_encoder") if n in names]
        return ", ".join(describe(n) for n in known) if known else f"models {sorted(names)}"

    def setup(self) -> None:
        grpc_url = triton_grpc_url(self.models.triton_url, self.models.triton_grpc_url)
        self.client = Af3Client(self.models.triton_url, grpc_url, model=self.models.triton_model)
        self.stream = getattr(self, "decoupled", True)  # a plain (non-decoupled) ensemble answers once

    def inputs(self, conv, new_tokens: int):
        """The gRPC InferInputs of one conversation (audio encoded to WAV bytes, MIN_TOKENS = MAX_TOKENS =
        new_tokens: the output length is fixed)."""
        prompt, audios = request_parts(conv)
        return self.client.inputs(prompt, audios or None, stream=self.stream, max_tokens=new_tokens,
                                  min_tokens=new_tokens)

    def run(self, convs, new_tokens: int) -> Call:
        requests = [self.inputs(c, new_tokens) for c in convs]
        stamps, errors = [[] for _ in requests], {}
        threads = [threading.Thread(target=_stream_one, args=(self.client, r, self.models.triton_model, stamps[i],
                                                               errors, i)) for i, r in enumerate(requests)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            i = min(errors)
            raise RuntimeError(f"expected {len(requests)} answers from {self.models.triton_model!r}, got an error "
                               f"on request {i}: {type(errors[i]).__name__}: {errors[i]}")
        total = max(s[-1] for s in stamps) - t0
        # MIN_TOKENS = MAX_TOKENS: every answer has new_tokens tokens (the server enforces it; text comes back)
        if not self.stream or any(len(s) < 2 for s in stamps):  # one response, or an empty answer: no TTFT
            return Call(total=total, new_tokens=new_tokens)
        ttft = max(s[0] for s in stamps) - t0  # every request has its first piece, as a batch's first token
        return Call(total=total, ttft=ttft, decode=total - ttft, new_tokens=new_tokens)


BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (
    TorchBackend, TorchFastBackend, TorchFP8Backend, HFBackend, HFCompiledBackend, TrtllmBackend, TritonBackend)}
REFERENCE_BACKEND = "hf"
# Run after the others, one backend at a time over all configurations and closed after its last
# row: they hold their own weight copies and static KV caches, or compile.
LATE_BACKENDS = ("torch-fast", "torch-fp8", "hf-compiled")
_DTYPE_NAMES = {DTYPES[n].torch: DTYPES[n].short for n in ("bfloat16", "float16", "float32")}  # torch -> label


def engine_labels(manifest) -> tuple[str, str]:
    """(decoder precision, KV-cache format) of an engine dir, as registry names
    (af3trt.formats.precision.PRECISIONS / KV_CACHES): the labels of its rows and the keys of its floors."""
    p = manifest.precision
    return get_precision(p["llm"]).name, get_kv_cache(p.get("kv_cache", "auto")).name


def _precision_name(decoder) -> str:
    return str(getattr(decoder, "precision", None) or _DTYPE_NAMES.get(getattr(decoder, "dtype", None), "?"))
