"""TensorRT-LLM decoder backend on the pinned 1.2 C++ Executor API (reference/trtllm.md §1.3).

Thin by design: every argument it passes is built by `stitch.executor_arguments`, which CPU tests
compare with what the torch backend consumes. One Executor per engine; requests from any thread
are enqueued on it (in-flight batching) and a dispatcher thread routes responses by request id.
`tensorrt_llm` is imported lazily; where it is missing, constructing the backend raises
`MissingDependency` with the install hint.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import torch

from .stitch import DecoderRequest, executor_arguments

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class MissingDependency(RuntimeError):
    """An optional NVIDIA package (tensorrt, tensorrt_llm) is not importable here."""


def import_executor():
    try:
        from tensorrt_llm.bindings import executor
    except ImportError as exc:
        raise MissingDependency(
            "the tensorrt_llm decoder needs TensorRT-LLM 1.2 (`pip install tensorrt_llm==1.2.* --extra-index-url "
            f"https://pypi.nvidia.com`, or an NGC tensorrt-llm container); import failed: {exc}"
        ) from exc
    return executor


def engine_config(engine_dir: str | Path) -> dict:
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"expected a TensorRT-LLM engine config at {path}, found none")
    return json.loads(path.read_text())


_LIMIT_FIELDS = {"max_batch_size": "max_batch_size", "max_input_len": "max_input_len", "max_seq_len": "max_seq_len",
                 "max_prompt_embedding_table_size": "max_prompt_embedding_table_size"}


def check_engine(config: dict, limits: dict, built_version: str | None, installed_version: str | None,
                 vocab_size: int | None = None) -> None:
    """Refuse an engine that is not the one the manifest describes: built by another TensorRT-LLM
    than the installed one, for other limits (build_config vs manifest limits) or another vocab."""
    from ..build.manifest import ManifestError

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
        raise ManifestError(f"expected an engine with vocab_size {vocab_size} (the model's), got {engine_vocab}")


class TensorRTLLMDecoder:
    """Decoder backend on a TensorRT-LLM engine dir (`llm/engine`). steps(requests) like TorchDecoder."""

    name = "tensorrt_llm"
    concurrent = True  # the executor batches the requests of all threads in flight (Pipeline needs no lock)

    def __init__(self, engine_dir: str | Path, end_id: int, pad_id: int, max_batch_size: int | None = None,
                 free_gpu_memory_fraction: float = 0.9, enable_block_reuse: bool = True):
        tl = import_executor()
        self._tl = tl
        self.config = engine_config(engine_dir)
        build, pretrained = self.config["build_config"], self.config["pretrained_config"]
        self.dtype = _DTYPES[pretrained["dtype"]]
        self.vocab_size = int(pretrained["vocab_size"])
        self.max_batch_size = int(max_batch_size or build["max_batch_size"])
        self.end_id, self.pad_id = int(end_id), int(pad_id)
        kv = tl.KvCacheConfig(free_gpu_memory_fraction=free_gpu_memory_fraction, enable_block_reuse=enable_block_reuse)
        cfg = tl.ExecutorConfig(max_batch_size=self.max_batch_size, max_beam_width=1, kv_cache_config=kv)
        self.executor = tl.Executor(Path(engine_dir), tl.ModelType.DECODER_ONLY, cfg)
        self._queues: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dispatch, name="af3trt-trtllm-responses", daemon=True)
        self._thread.start()

    def _request(self, req: DecoderRequest, streaming: bool):
        tl = self._tl
        args = executor_arguments(req, self.end_id, self.pad_id, streaming)
        args["sampling_config"] = tl.SamplingConfig(**{k: v for k, v in args["sampling_config"].items() if v is not None})
        if args["prompt_tuning_config"] is not None:
            ptc = args["prompt_tuning_config"]
            table = ptc["embedding_table"].to("cuda", self.dtype)  # cast on the GPU, engine dtype
            args["prompt_tuning_config"] = tl.PromptTuningConfig(table, ptc["input_token_extra_ids"])
        return tl.Request(**{k: v for k, v in args.items() if v is not None})

    def submit(self, req: DecoderRequest, streaming: bool = True) -> tuple[int, queue.Queue]:
        """Enqueue one request: (request id, queue of its responses: lists of new token ids, then None)."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            rid = self.executor.enqueue_request(self._request(req, streaming))
            self._queues[rid] = q
        return rid, q

    def cancel(self, rid: int) -> None:
        """Stop a request that is still running (a caller stopped reading its stream)."""
        with self._lock:
            if self._queues.pop(rid, None) is None:
                return  # already finished
        self.executor.cancel_request(rid)

    def _dispatch(self) -> None:
        from datetime import timedelta

        while not self._stop.is_set():
            for resp in self.executor.await_responses(timeout=timedelta(milliseconds=50)):
                with self._lock:
                    q = self._queues.get(resp.request_id)
                if q is None:
                    continue
                if resp.has_error():
                    q.put(RuntimeError(f"TensorRT-LLM request {resp.request_id} failed: {resp.error_msg}"))
                    q.put(None)
                    with self._lock:
                        self._queues.pop(resp.request_id, None)
                    continue
                q.put(list(resp.result.output_token_ids[0]))
                if resp.result.is_final:
                    q.put(None)
                    with self._lock:
                        self._queues.pop(resp.request_id, None)

    def steps(self, requests: list[DecoderRequest], generator=None):
        """Stream a batch: yields (B,) next ids per step; a finished row repeats end_id."""
        del generator  # sampling seeds travel in SamplingConfig.seed
        submitted = [self.submit(r, streaming=True) for r in requests]
        try:
            yield from self._collect([q for _, q in submitted], requests)
        finally:  # finished requests are gone from _queues already; cancel the others
            for rid, _ in submitted:
                self.cancel(rid)

    def _collect(self, queues: list[queue.Queue], requests: list[DecoderRequest]):
        pending = [list() for _ in requests]
        done = [False] * len(requests)
        produced = [0] * len(requests)
        limit = max(r.options.max_new_tokens for r in requests)
        for _ in range(limit):
            row = []
            for i, q in enumerate(queues):
                while not done[i] and not pending[i]:
                    item = q.get()
                    if item is None:
                        done[i] = True
                        if produced[i] < requests[i].options.max_new_tokens:
                            pending[i].append(self.end_id)  # stopped by end_id: mark the row finished
                    elif isinstance(item, Exception):
                        raise item
                    else:
                        pending[i].extend(item)
                row.append(pending[i].pop(0) if pending[i] else self.end_id)
                produced[i] += 1
            yield torch.tensor(row, dtype=torch.long)
            if all(done) and not any(pending):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.executor.shutdown()
