"""`af3trt` command line: tiny | run | build | triton | serve | bench. Each command calls a library function."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_tiny(args) -> int:
    from .testing import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.out, seed=args.seed))
    return 0


def _conversation(audios: list[str], prompt: str) -> list[dict]:
    content = [{"type": "audio", "audio": a} for a in audios] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _cmd_run(args) -> int:
    from .runtime import Pipeline

    pipe = Pipeline.from_pretrained(args.model, encoder=args.encoder, decoder=args.decoder,
                                    device=args.device, dtype=args.dtype)
    conv = _conversation(args.audio or [], args.prompt)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.stream and not args.json:
        for piece in pipe.stream(conv, **kw):
            print(piece, end="", flush=True)
        print()
        return 0
    result = pipe.generate(conv, **kw)[0]
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="af3trt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write the deterministic tiny random AF3 checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny)

    p = sub.add_parser("run", help="answer a prompt about audio files")
    p.add_argument("--model", required=True, help="AF3 checkpoint dir, engine dir, or 'tiny'")
    p.add_argument("--audio", action="append", help="audio file (repeat for several)")
    p.add_argument("--prompt", default="Transcribe the input speech.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--encoder", default="auto")
    p.add_argument("--decoder", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "num_audio_tokens", "timings"}')
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .audio import AudioError
    from .prompt import PromptError

    try:
        return args.func(args)
    except (AudioError, PromptError, FileNotFoundError, ValueError) as exc:
        print(f"af3trt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
