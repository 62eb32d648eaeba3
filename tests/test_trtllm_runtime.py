"""TensorRTLLMDecoder against a stand-in `tensorrt_llm.bindings.executor` with the TensorRT-LLM 1.2
binding signatures (cpp/tensorrt_llm/{pybind,nanobind}/executor/{request,executor,executorConfig}.cpp):
keyword names, keyword-only markers and the value checks of executor/samplingConfig.cpp, so a wrong
name or value fails here as it would on the real module. Its Executor follows the verified response
semantics (batch_manager/llmRequest.cpp `createResult`): a streaming response carries only the tokens
since the previous one, never the prompt, the final one possibly none; a non-streaming result holds the
prompt unless OutputConfig.exclude_input_from_output; end_id is left out of the output, stop words are
not; and the KV-reuse check of LlmRequest::validate plus the table checks of PromptTuningBuffers.
"""

import enum
import json
import queue
import sys
import threading
import types
from datetime import timedelta

import numpy as np
import pytest
import torch

from af3trt.runtime.generation import GenerationOptions
from af3trt.runtime.stitch import DecoderRequest, executor_arguments, hf_prompt_ids

VOCAB, HIDDEN, END, STOP, AUDIO_ID = 100, 8, 2, 3, 99
MAX_BATCH, TABLE_SIZE = 4, 4 * 64


# ------------------------------------------------------------------------- the stand-in module


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


def _opt(value, ok, what):
    if value is not None and not ok(value):
        raise ValueError(f"SamplingConfig: invalid {what} {value!r}")  # TLLM_CHECK in samplingConfig.cpp
    return value


class SamplingConfig:
    def __init__(self, beam_width=1, *, top_k=None, top_p=None, top_p_min=None, top_p_reset_ids=None,
                 top_p_decay=None, seed=None, temperature=None, min_tokens=None, beam_search_diversity_rate=None,
                 repetition_penalty=None, presence_penalty=None, frequency_penalty=None, length_penalty=None,
                 early_stopping=None, no_repeat_ngram_size=None, num_return_sequences=None, min_p=None,
                 beam_width_array=None):
        assert isinstance(beam_width, int) and beam_width >= 1
        self.beam_width = beam_width
        self.top_k = _opt(top_k, lambda v: isinstance(v, int) and v >= 0, "top_k")
        self.top_p = _opt(top_p, lambda v: 0.0 < v <= 1.0, "top_p")
        self.seed = _opt(seed, lambda v: isinstance(v, int) and 0 <= v < 2 ** 64, "seed")
        self.temperature = _opt(temperature, lambda v: v >= 0.0, "temperature")
        self.min_tokens = _opt(min_tokens, lambda v: isinstance(v, int) and v >= 0, "min_tokens")
        self.repetition_penalty = _opt(repetition_penalty, lambda v: v > 0.0, "repetition_penalty")
        # samplingConfig.cpp checks min_p in [0, 1]; presence and frequency penalties are unchecked
        self.min_p = _opt(min_p, lambda v: 0.0 <= v <= 1.0, "min_p")
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty

    @property
    def greedy(self):
        """The sampling layers' rule: defaults top_k 0, top_p 0.0; k == 0 and p == 0 means k = 1."""
        k, p = self.top_k or 0, self.top_p or 0.0
        return k == 1 or (k == 0 and p == 0.0)


class OutputConfig:
    def __init__(self, return_log_probs=False, return_context_logits=False, return_generation_logits=False,
                 exclude_input_from_output=False, return_encoder_output=False, return_perf_metrics=False,
                 additional_model_outputs=None):
        self.exclude_input_from_output = bool(exclude_input_from_output)


class PromptTuningConfig:
    def __init__(self, embedding_table, input_token_extra_ids=None):
        assert isinstance(embedding_table, torch.Tensor) and embedding_table.dim() == 2
        if input_token_extra_ids is not None:  # std::vector<uint64_t>
            assert all(isinstance(v, int) and 0 <= v < 2 ** 64 for v in input_token_extra_ids)
        self.embedding_table, self.input_token_extra_ids = embedding_table, input_token_extra_ids


class Request:
    def __init__(self, input_token_ids, max_tokens, *, streaming=False, sampling_config=None, output_config=None,
                 end_id=None, pad_id=None, position_ids=None, bad_words=None, stop_words=None, embedding_bias=None,
                 external_draft_tokens_config=None, prompt_tuning_config=None, multimodal_input=None,
                 multimodal_embedding=None, mrope_config=None, lora_config=None, lookahead_config=None,
                 kv_cache_retention_config=None, logits_post_processor_name=None, logits_post_processor=None,
                 encoder_input_token_ids=None, client_id=None, return_all_generated_tokens=False, priority=0.5,
                 type=None, context_phase_params=None, encoder_input_features=None, encoder_output_length=None,
                 cross_attention_mask=None, num_return_sequences=1, eagle_config=None, skip_cross_attn_blocks=None,
                 guided_decoding_params=None, language_adapter_uid=None, allotted_time_ms=None,
                 cache_salt_id=None):
        assert all(isinstance(t, int) and 0 <= t < 2 ** 31 for t in input_token_ids)  # VecTokens (int32)
        assert isinstance(max_tokens, int) and max_tokens >= 1
        assert sampling_config is None or isinstance(sampling_config, SamplingConfig)
        assert output_config is None or isinstance(output_config, OutputConfig)
        assert prompt_tuning_config is None or isinstance(prompt_tuning_config, PromptTuningConfig)
        for words in (stop_words, bad_words):  # std::list<VecTokens>
            assert words is None or all(isinstance(w, list) and all(isinstance(t, int) for t in w) for w in words)
        self.input_token_ids, self.max_tokens, self.streaming = list(input_token_ids), max_tokens, streaming
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id, self.pad_id, self.stop_words, self.bad_words = end_id, pad_id, stop_words, bad_words
        self.prompt_tuning_config = prompt_tuning_config


class KvCacheConfig:
    def __init__(self, enable_block_reuse=True, max_tokens=None, max_attention_window=None, sink_token_length=None,
                 free_gpu_memory_fraction=None, host_cache_size=None, onboard_blocks=True, cross_kv_cache_fraction=None,
                 secondary_offload_min_priority=None, event_buffer_max_size=0, *, enable_partial_reuse=True,
                 copy_on_partial_reuse=True, use_uvm=False, runtime_defaults=None):
        self.enable_block_reuse, self.free_gpu_memory_fraction = enable_block_reuse, free_gpu_memory_fraction


class ExecutorConfig:
    def __init__(self, max_beam_width=1, scheduler_config=None, kv_cache_config=None, enable_chunked_context=False,
                 normalize_log_probs=True, iter_stats_max_iterations=1000, request_stats_max_iterations=0,
                 batching_type=None, max_batch_size=None, max_num_tokens=None, parallel_config=None,
                 peft_cache_config=None, logits_post_processor_config=None, decoding_config=None,
                 use_gpu_direct_storage=False, gpu_weights_percent=1.0, max_queue_size=None,
                 extended_runtime_perf_knob_config=None, debug_config=None, recv_poll_period_ms=0,
                 max_seq_idle_microseconds=180000000, spec_dec_config=None, guided_decoding_config=None,
                 additional_model_outputs=None, cache_transceiver_config=None, gather_generation_logits=False,
                 mm_embedding_offloading=False, enable_trt_overlap=False):
        self.max_beam_width, self.max_batch_size = max_beam_width, max_batch_size
        self.kv_cache_config = kv_cache_config or KvCacheConfig()


class Result:
    def __init__(self, tokens, is_final, reason=FinishReason.NOT_FINISHED):
        self.output_token_ids, self.is_final, self.is_sequence_final = [list(tokens)], is_final, is_final
        self.finish_reasons, self.sequence_index = [reason], 0


class Response:
    def __init__(self, request_id, result=None, error_msg=None):
        self.request_id, self._result, self._error, self.client_id = request_id, result, error_msg, None

    def has_error(self):
        return self._error is not None

    @property
    def error_msg(self):
        return self._error

    @property
    def result(self):
        if self._error is not None:
            raise RuntimeError("no result on an error response")
        return self._result


_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Executor:
    """Generates what `script(request)` says: (tokens, FinishReason); tokens end with end_id for END_ID
    (dropped from the output, as the executor does) and with the stop word for STOP_WORDS (kept);
    reason None: still running (no final response until cancelled)."""

    script = None
    instances = []

    def __init__(self, model_path, model_type, executor_config):
        assert isinstance(model_type, ModelType) and isinstance(executor_config, ExecutorConfig)
        cfg = json.loads((model_path / "config.json").read_text())
        self.dtype = _DTYPE[cfg["pretrained_config"]["dtype"]]
        batch = executor_config.max_batch_size or cfg["build_config"]["max_batch_size"]
        self.max_rows = cfg["build_config"]["max_prompt_embedding_table_size"] // batch
        self.model_path, self.model_type, self.config = model_path, model_type, executor_config
        self.requests, self.cancelled, self.shut = {}, [], False
        self._responses, self._next = queue.Queue(), 0
        Executor.instances.append(self)

    def _check(self, req):
        ptc = req.prompt_tuning_config
        if ptc is None:
            return None
        if ptc.embedding_table.dtype != self.dtype:
            return "Request embedding table data type doesn't match model weight data type."
        if ptc.embedding_table.shape[0] > self.max_rows:
            return "Prompt vocab size is larger than max prompt vocab size"
        if self.config.kv_cache_config.enable_block_reuse and (
                not ptc.input_token_extra_ids or len(ptc.input_token_extra_ids) != len(req.input_token_ids)):
            return "Input token extra ids must be provided when enabling kv cache reuse with prompt table"
        return None

    def enqueue_request(self, request):
        assert isinstance(request, Request) and not self.shut
        self._next += 1
        rid = self._next
        self.requests[rid] = request
        error = self._check(request)
        if error:
            self._responses.put(Response(rid, error_msg=error))
            return rid
        tokens, reason = type(self).script(request)
        tokens = tokens[:request.max_tokens]
        out = tokens[:-1] if reason == FinishReason.END_ID else tokens
        if request.streaming:
            for t in out:
                self._responses.put(Response(rid, Result([t], False)))
            if reason is not None:
                self._responses.put(Response(rid, Result([], True, reason)))
        else:
            prefix = [] if request.output_config.exclude_input_from_output else request.input_token_ids
            self._responses.put(Response(rid, Result(prefix + out, True, reason)))
        return rid

    def await_responses(self, timeout=None):
        assert timeout is None or isinstance(timeout, timedelta)  # std::chrono::milliseconds caster
        try:
            first = self._responses.get(timeout=None if timeout is None else timeout.total_seconds())
        except queue.Empty:
            return []
        out = [first]
        while not self._responses.empty():
            out.append(self._responses.get())
        return out

    def cancel_request(self, id):
        self.cancelled.append(id)
        self._responses.put(Response(id, Result([], True, FinishReason.CANCELLED)))

    def shutdown(self):
        self.shut = True


def fake_module():
    mod = types.ModuleType("tensorrt_llm.bindings.executor")
    for obj in (ModelType, FinishReason, SamplingConfig, OutputConfig, PromptTuningConfig, Request, KvCacheConfig,
                ExecutorConfig, Result, Response, Executor):
        setattr(mod, obj.__name__, obj)
    return mod


@pytest.fixture
def tl(monkeypatch):
    mod = fake_module()
    root, bindings = types.ModuleType("tensorrt_llm"), types.ModuleType("tensorrt_llm.bindings")
    root.bindings, bindings.executor = bindings, mod
    for name, m in (("tensorrt_llm", root), ("tensorrt_llm.bindings", bindings),
                    ("tensorrt_llm.bindings.executor", mod)):
        monkeypatch.setitem(sys.modules, name, m)
    Executor.instances.clear()
    yield mod
    Executor.script = None


@pytest.fixture
def engine(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "pretrained_config": {"dtype": "bfloat16", "vocab_size": VOCAB},
        "build_config": {"max_batch_size": MAX_BATCH, "max_prompt_embedding_table_size": TABLE_SIZE}}))
    return tmp_path


def decoder(engine, **kw):
    from af3trt.runtime.trtllm import TensorRTLLMDecoder

    return TensorRTLLMDecoder(engine, end_id=END, pad_id=0, table_device="cpu", **kw)


def request(n_text=5, rows=3, **opts):
    """Text ids, then `rows` fake ids vocab+0.. (one audio), then text; extra ids > 0 on the fake ids."""
    ids = np.concatenate([np.arange(10, 10 + n_text), VOCAB + np.arange(rows), [40, 41]]).astype(np.int64)
    extra = np.where(ids >= VOCAB, 7, 0).astype(np.int64)
    options = GenerationOptions(**{"max_new_tokens": 6, "eos_token_ids": (END, STOP), **opts})
    return DecoderRequest(ids, torch.randn(rows, HIDDEN), extra, options, [rows] if rows else [],
                          prompt_ids=hf_prompt_ids(ids, VOCAB, AUDIO_ID))


def run(dec, reqs):
    return [row.tolist() for row in dec.steps(reqs)]


# ------------------------------------------------------------------------------------- tests


def test_decoder_builds_the_executor_with_the_binding_keywords(tl, engine):
    dec = decoder(engine, max_batch_size=2, free_gpu_memory_fraction=0.5)
    try:
        ex = Executor.instances[-1]
        assert ex.model_path == engine and ex.model_type is ModelType.DECODER_ONLY
        assert ex.config.max_batch_size == 2 and ex.config.max_beam_width == 1
        assert ex.config.kv_cache_config.enable_block_reuse and ex.config.kv_cache_config.free_gpu_memory_fraction == 0.5
        assert dec.dtype == torch.bfloat16 and dec.vocab_size == VOCAB
    finally:
        dec.close()
    assert ex.shut


def test_greedy_request_carries_the_prompt_table_and_extra_ids(tl, engine):
    Executor.script = staticmethod(lambda r: ([50, 51, END], FinishReason.END_ID))
    dec = decoder(engine)
    try:
        req = request()
        assert run(dec, [req]) == [[50], [51], [END]]
        sent = Executor.instances[-1].requests[1]
        assert sent.input_token_ids == req.input_ids.tolist() and sent.max_tokens == 6 and sent.streaming
        assert sent.end_id == END and sent.pad_id == 0 and sent.stop_words == [[STOP]]
        assert sent.output_config.exclude_input_from_output
        assert sent.sampling_config.greedy and sent.sampling_config.top_k == 1
        table = sent.prompt_tuning_config.embedding_table
        assert table.dtype == torch.bfloat16 and table.shape == (3, HIDDEN)  # the engine's dtype
        torch.testing.assert_close(table, req.table.to(torch.bfloat16))
        assert sent.prompt_tuning_config.input_token_extra_ids == req.extra_ids.tolist()
    finally:
        dec.close()


def test_text_only_request_has_no_prompt_table(tl, engine):
    Executor.script = staticmethod(lambda r: ([60, END], FinishReason.END_ID))
    dec = decoder(engine)
    try:
        assert run(dec, [request(rows=0)]) == [[60], [END]]
        assert Executor.instances[-1].requests[1].prompt_tuning_config is None
    finally:
        dec.close()


def test_sampling_is_not_turned_into_greedy(tl, engine):
    """top_k 0 + top_p 1.0 (plain temperature sampling) must reach the executor as top_p=1.0: with
    both left at their defaults (0, 0.0) the sampling layers decode greedily."""
    Executor.script = staticmethod(lambda r: ([70], FinishReason.LENGTH))
    dec = decoder(engine)
    try:
        run(dec, [request(max_new_tokens=1, do_sample=True, temperature=0.7)])
        run(dec, [request(max_new_tokens=1, do_sample=True, top_k=5, top_p=0.9, seed=11, min_new_tokens=1,
                          repetition_penalty=1.1)])
        plain, topk = (Executor.instances[-1].requests[i].sampling_config for i in (1, 2))
        assert not plain.greedy and plain.top_p == 1.0 and plain.temperature == 0.7
        assert plain.seed is not None  # unseeded sampling gets a fresh seed (the executor's default is 0)
        assert (topk.top_k, topk.top_p, topk.seed, topk.min_tokens, topk.repetition_penalty) == (5, 0.9, 11, 1, 1.1)
    finally:
        dec.close()


def test_every_generation_option_reaches_the_executor(tl, engine):
    """stitch.trtllm_sampling maps each option to its SamplingConfig / Request field (the one mapping,
    also behind the Triton repository's LLM tensors)."""
    Executor.script = staticmethod(lambda r: ([70], FinishReason.LENGTH))
    dec = decoder(engine)
    try:
        run(dec, [request(max_new_tokens=1, do_sample=True, temperature=0.6, top_k=7, top_p=0.85, min_p=0.05,
                          repetition_penalty=1.05, presence_penalty=0.5, frequency_penalty=0.25, min_new_tokens=1,
                          seed=9, bad_words=((5,), (40, 41)))])
        run(dec, [request(max_new_tokens=1, repetition_penalty=1.05, presence_penalty=0.5, min_p=0.05)])
        sampled, greedy = (Executor.instances[-1].requests[i] for i in (1, 2))
        s = sampled.sampling_config
        assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.presence_penalty,
                s.frequency_penalty, s.min_tokens, s.seed) == (0.6, 7, 0.85, 0.05, 1.05, 0.5, 0.25, 1, 9)
        assert sampled.bad_words == [[5], [40, 41]] and sampled.stop_words == [[STOP]]
        g = greedy.sampling_config  # penalties apply to greedy decoding too (as in HF); min_p only shapes sampling
        assert g.greedy and (g.repetition_penalty, g.presence_penalty, g.min_p) == (1.05, 0.5, None)
        assert greedy.bad_words is None
    finally:
        dec.close()


def test_streamed_batch_rows_match_the_torch_backend_layout(tl, engine):
    """Per step one id per request; end_id (absent from the executor's output) is appended where the
    executor ended on it; a stop word is already in the output; a finished row repeats end_id."""
    scripts = {10: ([50, 51, END], FinishReason.END_ID), 11: ([60, STOP], FinishReason.STOP_WORDS),
               12: ([70, 71, 72, 73], FinishReason.LENGTH)}
    Executor.script = staticmethod(lambda r: scripts[r.input_token_ids[0]])
    dec = decoder(engine)
    try:
        reqs = [request(n_text=1), request(n_text=2), request(n_text=3, max_new_tokens=4)]
        reqs[1].input_ids[0], reqs[2].input_ids[0] = 11, 12
        rows = run(dec, reqs)
        # the collector ends once every request has ended (a LENGTH end is seen one step later);
        # where each answer stops is generation.AnswerStream's decision, not the collector's
        assert [list(col) for col in zip(*rows)] == [[50, 51, END, END, END], [60, STOP, END, END, END],
                                                     [70, 71, 72, 73, END]]
    finally:
        dec.close()


def test_collect_assembles_multi_token_and_empty_final_responses(tl, engine):
    from af3trt.runtime.trtllm import Finished

    dec = decoder(engine)
    try:
        qa, qb = queue.Queue(), queue.Queue()
        for item in ([5, 6], [7], Finished("END_ID"), None):  # several tokens per response (e.g. draft tokens)
            qa.put(item)
        for item in ([8], [9, 10], Finished("LENGTH"), None):
            qb.put(item)
        rows = [r.tolist() for r in dec._collect([qa, qb])]
        assert rows == [[5, 8], [6, 9], [7, 10], [END, END]]
    finally:
        dec.close()


def test_non_streaming_result_is_the_new_tokens_only(tl, engine):
    from af3trt.runtime.trtllm import Finished

    Executor.script = staticmethod(lambda r: ([50, 51, END], FinishReason.END_ID))
    dec = decoder(engine)
    try:
        _, q = dec.submit(request(), streaming=False)
        assert [q.get(timeout=5) for _ in range(3)] == [[50, 51], Finished("END_ID"), None]
    finally:
        dec.close()


def test_executor_errors_reach_the_caller(tl, engine):
    Executor.script = staticmethod(lambda r: ([50], FinishReason.LENGTH))
    dec = decoder(engine, enable_block_reuse=True)
    try:
        bad = request()
        bad.table = bad.table.to(torch.float16)
        dec.dtype = torch.float16  # a table in another dtype than the engine's is refused
        with pytest.raises(RuntimeError, match="data type doesn't match"):
            run(dec, [bad])
    finally:
        dec.close()


def test_abandoned_stream_cancels_only_unfinished_requests(tl, engine):
    scripts = {10: ([50, END], FinishReason.END_ID), 11: ([60, 61, 62], None)}  # the second still runs
    Executor.script = staticmethod(lambda r: scripts[r.input_token_ids[0]])
    dec = decoder(engine)
    try:
        reqs = [request(n_text=1), request(n_text=2)]
        reqs[1].input_ids[0] = 11
        steps = dec.steps(reqs)
        assert [next(steps).tolist() for _ in range(3)] == [[50, 60], [END, 61], [END, 62]]
        steps.close()
        assert Executor.instances[-1].cancelled == [2] and not dec._queues
    finally:
        dec.close()


def test_concurrent_threads_share_one_executor(tl, engine):
    Executor.script = staticmethod(lambda r: ([r.input_token_ids[0] + 1, END], FinishReason.END_ID))
    dec = decoder(engine)
    got, errors = {}, []

    def worker(k):
        try:
            req = request(n_text=1)
            req.input_ids[0] = 20 + k
            got[k] = run(dec, [req])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert not errors and got == {k: [[21 + k], [END]] for k in range(8)}
        assert len(Executor.instances) == 1 and len(Executor.instances[0].requests) == 8
    finally:
        dec.close()


def test_executor_arguments_name_only_request_keywords():
    """Every key executor_arguments returns is a keyword of the binding's Request, and its nested
    dicts are keywords of SamplingConfig / OutputConfig / PromptTuningConfig."""
    import inspect

    args = executor_arguments(request(do_sample=True, top_k=3, top_p=0.5, seed=1), END, 0, streaming=True)
    assert set(args) <= set(inspect.signature(Request).parameters)
    assert set(args["sampling_config"]) <= set(inspect.signature(SamplingConfig).parameters)
    assert set(args["output_config"]) <= set(inspect.signature(OutputConfig).parameters)
    assert set(args["prompt_tuning_config"]) <= set(inspect.signature(PromptTuningConfig).parameters)
    greedy = executor_arguments(request(), END, 0)["sampling_config"]
    assert (greedy["top_k"], greedy["top_p"], greedy["temperature"]) == (1, None, None)
