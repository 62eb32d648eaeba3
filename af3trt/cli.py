"""`af3trt` command line; each command calls a library function.

    af3trt tiny   --out DIR                          the deterministic tiny random AF3 checkpoint
    af3trt run    --model M --audio A --prompt P     answer a prompt about audio files (Pipeline)
    af3trt build  --model M --out ENGINE_DIR         engine dir (af3trt.build.engine_dir.build_engine_dir)
    af3trt triton --engine-dir E --out REPO          Triton model repository (af3trt.build.triton.write_repository)
    af3trt serve  --repo REPO                        tritonserver on it, in the foreground (af3trt.serving.server.serve)
    af3trt openai --model M | --triton-url H:P       OpenAI-compatible API (af3trt.serving.openai_server.serve)
    af3trt bench  ARGS                               latency benchmark (af3trt.benchmark.cli; = benchmarks/latency.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import traceback
import warnings


def _cmd_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.out, seed=args.seed, vocab_size=args.vocab_size))
    return 0


def _conversation(audios: list[str], prompt: str) -> list[dict]:
    content = [{"type": "audio", "audio": a} for a in audios] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


@contextlib.contextmanager
def _audio_warnings(command: str):
    """Collect what was done to the audio (truncated to 10 minutes, decoded short): said once on stderr,
    and listed for --json (as the server's WARNINGS); other warnings are shown as usual."""
    from .audio import AudioIncompleteWarning, AudioTruncatedWarning

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield notes
    for w in caught:
        if issubclass(w.category, (AudioTruncatedWarning, AudioIncompleteWarning)):
            notes.append(str(w.message))
            print(f"af3trt {command}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _cmd_run(args) -> int:
    from .runtime import Pipeline

    pipe = Pipeline.from_pretrained(args.model, encoder=args.encoder, decoder=args.decoder,
                                    device=args.device, dtype=args.dtype, variant=args.variant,
                                    think_suffix=not args.no_think_suffix)
    backends = {"encoder": pipe.encoder.name, "decoder": pipe.decoder.name}
    picked = [f"{k} {v}" + (" (best available)" if getattr(args, k) == "auto" else "") for k, v in backends.items()]
    print(f"af3trt run: {', '.join(picked)}", file=sys.stderr)
    conv = _conversation(args.audio or [], args.prompt)
    kw = {name: getattr(args, name) for name in (*GENERATION_FLAGS, "do_sample", "stop")}
    if args.stream and not args.json:
        with _audio_warnings("run"):
            for piece in pipe.stream(conv, **kw):
                print(piece, end="", flush=True)
        print()
        return 0
    with _audio_warnings("run"):
        result = pipe.generate(conv, **kw)[0]
    if args.json:
        print(json.dumps({**result.to_dict(), "backends": backends}))  # warnings: Result.warnings
    else:
        print(result.text)
    return 0


def _cmd_build(args) -> int:
    from .build.engine_dir import BuildOptions, build_engine_dir
    from .build.llm import EngineLimits
    from .tiny import default_tiny_dir, make_tiny_checkpoint

    model = make_tiny_checkpoint(default_tiny_dir()) if args.model == "tiny" else args.model
    limits = EngineLimits(max_batch_size=args.max_batch_size, max_audio_seconds=args.max_audio_seconds,
                          max_text_tokens=args.max_text_tokens, max_new_tokens=args.max_new_tokens)
    options = BuildOptions(precision=args.precision, kv_cache=args.kv_cache, tp_size=args.tp_size,
                           encoder_precision=args.encoder_precision, encoder_input=args.encoder_input,
                           limits=limits, calib_audio=args.calib_audio,
                           calib_size=args.calib_size, calib_max_tokens=args.calib_max_tokens,
                           stages=tuple(args.stages.split(",")), force=args.force, variant=args.variant,
                           target_sm=args.target_sm)
    done: dict = {}
    manifest = build_engine_dir(model=model, out=args.out, options=options, summary=done)
    finish = []
    for name, entry in manifest.stages.items():
        if name in done:
            did = done[name]
        else:  # not asked for this time (--stages): what an earlier build left
            did = f"left for a machine that has {entry.get('needs', 'it')}" if "missing" in entry else \
                "kept from an earlier build"
        if "missing" in entry:
            print(f"{name}: {did} ({entry['missing']})")
            finish += [entry["command"]] if entry["command"] not in finish else []
        else:
            print(f"{name}: {entry['path']} ({did})")
    print(build_summary(done))
    for command in finish:  # the same line finishes every missing stage: said once
        print(f"finish on a machine that has them, from inside the engine dir (it can be copied there):\n"
              f"  cd {shlex.quote(args.out)} && {command}")
    return 0


def build_summary(done: dict) -> str:
    """One line: the stages this build skipped, rebuilt, built and left for a machine with TensorRT
    (`done`: build_engine_dir's summary), every group named even when empty."""
    left = "left for a machine with TensorRT / TensorRT-LLM"
    groups = {"skipped (unchanged)": [], "rebuilt": [], "built": [], left: []}
    for name, did in done.items():
        group = ("skipped (unchanged)" if did.startswith("unchanged") else "rebuilt" if did.startswith("rebuilt")
                 else left if did.startswith("left for") else "built")
        groups[group].append(name)
    return "af3trt build: " + "; ".join(f"{g}: {', '.join(n) if n else 'none'}" for g, n in groups.items())


def _cmd_triton(args) -> int:
    from .build.triton import write_repository

    repo = write_repository(args.engine_dir, args.out, llm_backend=args.llm_backend,
                            max_batch_size=args.max_batch_size, instances=args.instances, streaming=args.streaming,
                            encoder_backend=args.encoder_backend, server_engine_dir=args.server_engine_dir,
                            kv_cache_free_gpu_mem_fraction=args.kv_cache_fraction)
    print(repo.path)
    print(f"models: {', '.join(repo.models)} (llm: {args.llm_backend}, encoder: {repo.encoder})")
    return 0


def _cmd_serve(args) -> int:
    from .serving.server import TritonServerError, serve

    try:
        code = serve(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                     metrics_port=args.metrics_port)
    except TritonServerError as exc:
        print(f"af3trt serve: error: {exc}", file=sys.stderr)
        return 2
    if code != 0:
        print(f"af3trt serve: error: tritonserver exited with code {code} (its log is above)", file=sys.stderr)
        return code if code > 0 else 1
    return 0


def _cmd_bench(rest: list[str]) -> int:
    """The benchmark's own parser (af3trt.benchmark.cli, imports torch) reads the arguments after `bench`."""
    from .benchmark.cli import main as bench_main

    return bench_main(rest, prog="af3trt bench")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines end with the option's default, unless it has none or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_triton(sub) -> None:
    p = sub.add_parser("triton", help="engine dir -> Triton model repository (preprocessing, encoder, LLM, af3, ensemble)",
                       formatter_class=_DefaultsFormatter)
    p.add_argument("--engine-dir", "--engine", dest="engine_dir", required=True,
                   help="engine dir (af3trt build), or an AF3 checkpoint dir with --llm-backend python")
    p.add_argument("--out", required=True, help="model repository to write (replaces an earlier af3trt one)")
    p.add_argument("--llm-backend", default="tensorrtllm", choices=("tensorrtllm", "python"),
                   help="tensorrtllm: C++ backend on llm/engine; python: af3trt's torch decoder (CPU reference)")
    p.add_argument("--encoder-backend", default="auto", choices=("auto", "tensorrt", "onnxruntime", "torch"),
                   help="audio_encoder model: auto = the plan with tensorrtllm, else ONNX Runtime, else torch")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: the engine dir's limit")
    p.add_argument("--instances", type=int, default=1, help="instances of each python model")
    p.add_argument("--streaming", dest="streaming", action="store_true", default=True,
                   help="decoupled LLM model that streams tokens (the default)")
    p.add_argument("--no-streaming", dest="streaming", action="store_false", help="non-decoupled LLM model")
    p.add_argument("--server-engine-dir", default=None,
                   help="where the server sees the engine dir (e.g. a container mount); default: where it is now")
    p.add_argument("--kv-cache-fraction", type=float, default=0.8,
                   help="share of the GPU memory left free by the engine's weights that the KV cache takes; the rest "
                        "stays for the encoder plan, the python models and the prompt-table memory pool")
    p.set_defaults(func=_cmd_triton)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run tritonserver on a model repository until Ctrl-C / SIGTERM (HTTP 8000, "
                       "gRPC 8001, metrics 8002 on 127.0.0.1)", formatter_class=_DefaultsFormatter)
    p.add_argument("--repo", required=True, help="model repository (af3trt triton --out)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind HTTP, gRPC and metrics to")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (generate endpoint, health)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (streaming)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.set_defaults(func=_cmd_serve)


def _cmd_openai(args) -> int:
    from .serving.openai_server import serve

    return serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
                 allow_urls=args.allow_urls, max_queue=args.max_queue, max_body_bytes=args.max_body_mb * 1024 * 1024,
                 encoder=args.encoder, decoder=args.decoder, device=args.device, dtype=args.dtype,
                 triton_url=args.triton_url)


def _add_openai(sub) -> None:
    p = sub.add_parser("openai", help="OpenAI-compatible API (chat completions with audio, transcriptions)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="serve in-process: engine dir (af3trt build), AF3 checkpoint dir, "
                   "or 'tiny' (exactly one of --model / --triton-url)")
    p.add_argument("--triton-url", default=None, metavar="HOST:PORT",
                   help="forward every request to the `af3` model of a running af3trt Triton repository over gRPC "
                        "(`af3trt serve`'s gRPC address, e.g. 127.0.0.1:8001); limits come from the repository")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless you mean otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="af3", help="the `model` clients send and /v1/models lists")
    p.add_argument("--allow-urls", action="store_true", help="fetch http(s) audio_url parts (size-capped, with a timeout)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running before 503")
    p.add_argument("--max-body-mb", type=int, default=200, help="request body limit (413 past it)")
    p.add_argument("--encoder", default="auto", help="encoder backend (in-process only)")
    p.add_argument("--decoder", default="auto", help="decoder backend (in-process only)")
    p.add_argument("--device", default=None, help="cuda or cpu (in-process only; default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (in-process only; default: by device)")
    p.set_defaults(func=_cmd_openai)


def _add_bench(sub) -> None:
    # no arguments (nor -h) here: main() hands the rest to the benchmark's parser (`af3trt bench --help`)
    sub.add_parser("bench", add_help=False, help="latency benchmark: same arguments as benchmarks/latency.py")


# `af3trt run` generation flags: absent = the model's generation_config.json default (as HF `generate`)
GENERATION_FLAGS = {
    "max_new_tokens": (int, "new tokens at most (default: generation_config's max_new_tokens, else 256)"),
    "min_new_tokens": (int, "no eos before this many new tokens"),
    "temperature": (float, "sampling temperature (needs sampling on)"),
    "top_k": (int, "sample among the k most likely ids (0 = off; needs sampling on)"),
    "top_p": (float, "nucleus sampling mass (1.0 = off; needs sampling on)"),
    "min_p": (float, "drop ids below min_p x the top probability (0 = off; needs sampling on)"),
    "repetition_penalty": (float, "HF repetition penalty (1.0 = off; applies to greedy decoding too)"),
    "presence_penalty": (float, "OpenAI presence penalty over the generated ids (0 = off)"),
    "frequency_penalty": (float, "OpenAI frequency penalty over the generated ids (0 = off)"),
    "seed": (int, "sampling seed"),
}


def _model_defaults(argv: list[str]) -> str | None:
    """`af3trt run --model M --help`: M's generation defaults (its generation_config.json, resolved as
    for a request), for the help's generation section; None without --model or a readable config."""
    if "--model" not in argv or argv.index("--model") + 1 >= len(argv):
        return None
    from pathlib import Path

    model = argv[argv.index("--model") + 1]
    if model == "tiny":
        from .tiny import default_tiny_dir

        model = str(default_tiny_dir())
    root = Path(model)
    folder = root / "tokenizer" if (root / "manifest.json").is_file() else root
    if not (folder / "generation_config.json").is_file():
        return None
    try:
        from .runtime.generation import GenerationDefaults

        opts = GenerationDefaults.from_dir(folder).as_dict()
    except Exception:  # help stays available whatever the folder holds
        return None
    shown = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    return f"{model}'s defaults: " + ", ".join(f"{k}={opts[k]}" for k in shown)


def _add_generation(p, defaults: str | None = None) -> None:
    g = p.add_argument_group("generation (each default comes from the model's generation_config.json)",
                             defaults)
    g.add_argument("--do-sample", dest="do_sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample (--do-sample) or decode greedily (--no-do-sample)")
    for name, (kind, text) in GENERATION_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeat for several)")


def build_parser(run_defaults: str | None = None) -> argparse.ArgumentParser:
    from . import __version__
    from .formats.precision import KV_CACHES, PRECISIONS

    parser = argparse.ArgumentParser(prog="af3trt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"af3trt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = _DefaultsFormatter

    p = sub.add_parser("tiny", help="write the deterministic tiny random AF3 checkpoint", formatter_class=defaults)
    p.add_argument("--out", required=True, help="checkpoint dir to write (HF layout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="LM vocab rows, at least the tokenizer's 556 ids (default: 640, a multiple of 64; an odd one "
                        "such as 632 is what ModelOpt pads for int4_awq, like the real 151672)")
    p.set_defaults(func=_cmd_tiny)

    p = sub.add_parser("build", help="AF3 checkpoint -> engine dir (ONNX/TensorRT encoder, TensorRT-LLM decoder)",
                       formatter_class=defaults)
    p.add_argument("--model", required=True, help="AF3 checkpoint dir (HF layout) or 'tiny'")
    p.add_argument("--out", required=True, help="engine dir to write")
    from .formats.precision import KV_CACHES, PRECISIONS  # the one registry: build, floors, labels, these choices

    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
                   help="decoder precision: " + "; ".join(f"{k}: {v.description}" for k, v in PRECISIONS.items()))
    p.add_argument("--kv-cache", default="auto", choices=list(KV_CACHES),
                   help="KV-cache format: " + "; ".join(f"{k}: {v.description}" for k, v in KV_CACHES.items()))
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs (must divide the attention heads)")
    p.add_argument("--encoder-precision", default="fp16", choices=("fp16", "bf16", "fp8", "int8"),
                   help="TensorRT encoder plan precision")
    p.add_argument("--encoder-input", default="features", choices=("features", "audio"),
                   help="what the encoder graph takes: features (log-mel windows) | audio (padded 16 kHz windows, "
                        "log-mel by a conv STFT inside the graph; fp16|bf16 encoder plans)")
    p.add_argument("--max-batch-size", type=int, default=1, help="requests in flight in the engine")
    p.add_argument("--max-audio-seconds", type=float, default=600.0, help="audio per request (at most 600)")
    p.add_argument("--max-text-tokens", type=int, default=2048, help="prompt tokens per request besides audio")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="generated tokens per request")
    p.add_argument("--calib-audio", default=None, help="folder of calibration audio (default: bundled + synthetic)")
    p.add_argument("--calib-size", type=int, default=16, help="calibration prompts / encoder windows")
    p.add_argument("--calib-max-tokens", type=int, default=1024, help="tokens per calibration prompt")
    p.add_argument("--stages", default="encoder,llm", help="comma-separated: encoder,llm")
    p.add_argument("--force", action="store_true", help="rebuild stages even when unchanged")
    p.add_argument("--variant", default="base", choices=("base", "think"),
                   help="think: AF3-Think, the checkpoint's think/ LoRA + non-LoRA weights (a separate engine dir)")
    p.add_argument("--target-sm", type=int, default=None,
                   help="GPU the engine is for when none is present at build, as major*10+minor (default 90: "
                        "H100/H200); decides which KV-cache options trtllm-build keeps or refuses")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("run", help="answer a prompt about audio files", formatter_class=defaults)
    p.add_argument("--model", required=True, help="engine dir (af3trt build), AF3 checkpoint dir, or 'tiny'")
    p.add_argument("--audio", action="append", help="audio file (repeat for several)")
    p.add_argument("--prompt", default="Transcribe the input speech.")
    _add_generation(p, run_defaults)
    p.add_argument("--encoder", default="auto", choices=("auto", "tensorrt", "onnxruntime", "torch"),
                   help="encoder backend; auto = the best available in the dir")
    p.add_argument("--decoder", default="auto", choices=("auto", "tensorrt_llm", "torch-fast", "torch"),
                   help="decoder backend; auto = the best available in the dir")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                   help="torch backends' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--variant", default=None, choices=("base", "think"),
                   help="think: AF3-Think weights of a checkpoint dir (default base); an engine dir runs what it was built as")
    p.add_argument("--no-think-suffix", action="store_true",
                   help="think variant: do not end the last user turn with its trained instruction")
    p.add_argument("--json", action="store_true",
                   help='print {"text", "token_ids", "num_audio_tokens", "timings", "backends", "warnings"}')
    p.set_defaults(func=_cmd_run)
    _add_triton(sub)
    _add_serve(sub)
    _add_openai(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    asks_help = argv[:1] == ["run"] and ("-h" in argv or "--help" in argv)
    parser = build_parser(_model_defaults(argv) if asks_help else None)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from . import __version__
    from .errors import UserError

    try:
        return _cmd_bench(rest) if args.command == "bench" else args.func(args)
    except UserError as exc:  # the user's to fix: one line
        print(f"af3trt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; rerun the same command to resume (finished stages are kept)" if args.command == "build" else ""
        print(f"\naf3trt {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except Exception:  # ours to fix: the whole traceback
        traceback.print_exc()
        print(f"af3trt {args.command}: internal error: this is a bug in af3trt {__version__}; please report it "
              f"with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
