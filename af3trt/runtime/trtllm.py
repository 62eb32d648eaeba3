"""TensorRT-LLM decoder backend on the TensorRT-LLM 1.2 C++ Executor bindings
(`tensorrt_llm.bindings.executor`; checked against the 1.2 pybind/nanobind sources, see
tests/test_trtllm_runtime.py for the contract as a fake module).

Thin by design: every argument it passes is built by `stitch.executor_arguments`, which CPU tests
compare with what the torch backend consumes. One Executor per engine; requests from any thread
are enqueued on it (in-flight batching) and a dispatcher thread routes responses by request id.
Executor semantics this relies on: a streaming request's responses each carry only the tokens
generated since the previous response (never the prompt), the final one (`is_final`) possibly
none; end_id is never part of the output (the stop words are); `finish_reasons[0]` of the final
result says why it ended. `tensorrt_llm` is imported lazily; where it is missing, constructing the
backend raises `MissingDependency` with the install hint.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dtypes
from ..errors import MissingDependency, OptionError
from ..formats.manifest import ManifestError
from ..formats.trtllm_engine import engine_config
from .stitch import DecoderRequest, executor_arguments, request_seed

def import_executor():
    try:
        from tensorrt_llm.bindings import executor
    except ImportError as exc:
        raise MissingDependency(
            "the tensorrt_llm decoder needs TensorRT-LLM 1.2 (`pip install tensorrt_llm==1.2.* --extra-index-url "
            f"https://pypi.nvidia.com`, or an NGC tensorrt-llm container); import failed: {exc}"
        ) from exc
    return executor


_LIMIT_FIELDS = {"max_batch_size": "max_batch_size", "max_input_len": "max_input_len", "max_seq_len": "max_seq_len",
                 "max_prompt_embedding_table_size": "max_prompt_embedding_table_size"}


def check_engine(config: dict, limits: dict, built_version: str | None, installed_version: str | None,
                 vocab_size: int | None = None) -> None:
    """Refuse an engine that is not the one the manifest describes: built by another TensorRT-LLM
    than the installed one, for other limits (build_config vs manifest limits) or another vocab."""
    if built_version != installed_version:
        raise ManifestError(f"llm/engine was built with TensorRT-LLM {built_version}, this is {installed_version}: "
                            f"rebuild it with llm/build_engine.sh")
    build = config.get("build_config", {})
    differs = [f"{key}: engine {build.get(key)}, manifest {limits.get(want)}" for key, want in _LIMIT_FIELDS.items()
               if limits.get(want) is not None and build.get(key) != limits.get(want)]
    if differs:
        raise ManifestError("llm/engine was built for other limits than the manifest's: " + "; ".join(differs))
    engine_vocab = config.get("pretrained_config", {}).get("vocab_size")
    if vocab_size is not None and engine_vocab != vocab_size:
        raise ManifestError(f"expected an engine with vocab_size {vocab_size} (the manifest's engine_vocab_size, "
                            f"where fake ids start), got {engine_vocab}")


def check_single_rank(config: dict, engine_dir) -> None:
    """The in-process decoder drives one rank: the executor in leader mode needs an MPI world of
    tp*pp ranks (executorImpl.cpp: "MPI worldSize is expected to be equal to tp*pp*cp"). A TP/PP > 1
    engine is served by Triton, one rank per GPU under mpirun (af3trt.serving.launch)."""
    mapping = (config.get("pretrained_config") or {}).get("mapping") or {}
    world = int(mapping.get("tp_size", 1)) * int(mapping.get("pp_size", 1))
    if world > 1:
        root = Path(engine_dir).parent.parent
        raise OptionError(f"expected a single-rank engine for the in-process TensorRT-LLM decoder, got tp_size "
                         f"{mapping.get('tp_size', 1)} x pp_size {mapping.get('pp_size', 1)} = {world} ranks in "
                         f"{engine_dir}. Serve it with one rank per GPU: af3trt triton --engine-dir {root} --out REPO "
                         f"&& af3trt serve --repo REPO (mpirun -n {world}), or use --decoder torch here")


@dataclass(frozen=True)
class Finished:
    """Last item but one of a request's response queue: why the executor ended it (FinishReason name:
    END_ID, STOP_WORDS, LENGTH, TIMED_OUT, CANCELLED)."""

    reason: str


def _reason(result) -> str:
    reasons = list(getattr(result, "finish_reasons", None) or [])
    return getattr(reasons[0], "name", str(reasons[0])).split(".")[-1] if reasons else "UNKNOWN"


class TensorRTLLMDecoder:
    """Decoder backend on a TensorRT-LLM engine dir (`llm/engine`). steps(requests) like TorchDecoder."""

    name = "tensorrt_llm"
    concurrent = True  # the executor batches the requests of all threads in flight (Pipeline needs no lock)

    def __init__(self, engine_dir: str | Path, end_id: int, pad_id: int, max_batch_size: int | None = None,
                 free_gpu_memory_fraction: float = 0.9, enable_block_reuse: bool = True,
                 table_device: str = "cuda", valid_vocab: int | None = None):
        self.config = engine_config(engine_dir)
        check_single_rank(self.config, engine_dir)
        tl = import_executor()
        self._tl = tl
        build, pretrained = self.config["build_config"], self.config["pretrained_config"]
        self.dtype = dtypes.dtype(pretrained["dtype"]).torch  # the executor rejects a prompt table of another dtype
        self.vocab_size = int(pretrained["vocab_size"])  # fake ids start here (padded for int4_awq)
        self.valid_vocab = int(valid_vocab or self.vocab_size)
        if not 0 < self.valid_vocab <= self.vocab_size:
            raise ValueError(f"expected valid_vocab in (0, {self.vocab_size}] (the engine's vocab_size), got {valid_vocab}")
        self.max_batch_size = int(max_batch_size or build["max_batch_size"])
        self.end_id, self.pad_id = int(end_id), int(pad_id)
        self.table_device = table_device  # the executor copies a host table to the GPU itself
        kv = tl.KvCacheConfig(enable_block_reuse=enable_block_reuse, free_gpu_memory_fraction=free_gpu_memory_fraction)
        cfg = tl.ExecutorConfig(max_beam_width=1, kv_cache_config=kv, max_batch_size=self.max_batch_size)
        self.executor = tl.Executor(Path(engine_dir), tl.ModelType.DECODER_ONLY, cfg)
        self._queues: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dispatch, name="af3trt-trtllm-responses", daemon=True)
        self._thread.start()

    def _request(self, req: DecoderRequest, streaming: bool):
        tl = self._tl
        args = executor_arguments(req, self.end_id, self.pad_id, streaming, valid_vocab=self.valid_vocab,
                                  vocab_size=self.vocab_size)
        sampling = {**args["sampling_config"], "seed": request_seed(req.options)}
        sampling = {k: v for k, v in sampling.items() if v is not None}
        args["sampling_config"] = tl.SamplingConfig(**sampling)
        args["output_config"] = tl.OutputConfig(**args["output_config"])
        if args["prompt_tuning_config"] is not None:
            ptc = args["prompt_tuning_config"]
            table = ptc["embedding_table"].to(self.table_device, self.dtype).contiguous()
            args["prompt_tuning_config"] = tl.PromptTuningConfig(
                embedding_table=table, input_token_extra_ids=ptc["input_token_extra_ids"])
        return tl.Request(**{k: v for k, v in args.items() if v is not None})

    def submit(self, req: DecoderRequest, streaming: bool = True) -> tuple[int, queue.Queue]:
        """Enqueue one request: (request id, queue of its responses). The queue holds lists of new
        token ids (prompt excluded, streaming or not), then a `Finished(reason)`, then None; or an
        exception, then None."""
        request = self._request(req, streaming)  # tables are cast/copied outside the lock
        q: queue.Queue = queue.Queue()
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("the TensorRT-LLM decoder is closed")
            rid = self.executor.enqueue_request(request)
            self._queues[rid] = q
        return rid, q

    def cancel(self, rid: int) -> None:
        """Stop a request that is still running (a caller stopped reading its stream)."""
        with self._lock:
            if self._queues.pop(rid, None) is None:
                return  # already finished
        self.executor.cancel_request(rid)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            pending, self._queues = list(self._queues.values()), {}
        for q in pending:
            q.put(exc)
            q.put(None)

    def _dispatch(self) -> None:
        from datetime import timedelta

        while not self._stop.is_set():
            try:
                responses = self.executor.await_responses(timeout=timedelta(milliseconds=50))
            except Exception as exc:  # a dead executor must not leave readers blocked forever
                self._fail_all(RuntimeError(f"TensorRT-LLM executor failed: {exc}"))
                return
            for resp in responses:
                with self._lock:
                    q = self._queues.get(resp.request_id)
                if q is None:
                    continue  # cancelled or unknown
                final = resp.has_error() or resp.result.is_final
                if final:  # unregister first: a reader that saw the end never cancels a finished request
                    with self._lock:
                        self._queues.pop(resp.request_id, None)
                if resp.has_error():
                    q.put(RuntimeError(f"TensorRT-LLM request {resp.request_id} failed: {resp.error_msg}"))
                    q.put(None)
                    continue
                result = resp.result
                tokens = list(result.output_token_ids[0]) if result.output_token_ids else []
                if tokens:
                    q.put(tokens)
                if final:
                    q.put(Finished(_reason(result)))
                    q.put(None)

    def steps(self, requests: list[DecoderRequest], generator=None, stats=None):
        """Stream a batch: yields (B,) next ids per step; a finished row repeats end_id. The executor
        applies the sampling options itself (`stitch.trtllm_sampling`); the caller's
        `generation.AnswerStream` decides where each answer ends, and closing this generator
        cancels what still runs."""
        del generator, stats  # sampling seeds travel in SamplingConfig.seed; the steps run in the executor
        submitted = [self.submit(r, streaming=True) for r in requests]
        try:
            yield from self._collect([q for _, q in submitted])
        finally:  # finished requests are gone from _queues already; cancel the others
            for rid, _ in submitted:
                self.cancel(rid)

    def _collect(self, queues: list[queue.Queue]):
        """Per step one token per request from the streamed responses, until every request ended. A
        request the executor ended on end_id (which it leaves out of the output) gets end_id
        appended, so the caller sees the stop; one ended by a stop word already shows it."""
        pending = [list() for _ in queues]
        done = [False] * len(queues)
        while True:
            row = []
            for i, q in enumerate(queues):
                while not done[i] and not pending[i]:
                    item = q.get()
                    if item is None:
                        done[i] = True
                    elif isinstance(item, Exception):
                        raise item
                    elif isinstance(item, Finished):
                        done[i] = True
                        if item.reason in ("END_ID", "UNKNOWN"):
                            pending[i].append(self.end_id)
                    else:
                        pending[i].extend(item)
                row.append(pending[i].pop(0) if pending[i] else self.end_id)
            yield torch.tensor(row, dtype=torch.long)
            if all(done) and not any(pending):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._fail_all(RuntimeError("the TensorRT-LLM decoder was closed"))
        self.executor.shutdown()
