#!/usr/bin/env python
"""Accuracy of a candidate pipeline (quantized) against a reference (bf16) on audio + transcripts.

    python benchmarks/accuracy.py --data DIR --reference CKPT --candidate ENGINE_DIR --out acc.json
    python benchmarks/accuracy.py --reference tiny --candidate tiny --candidate-dtype bfloat16 --out acc.json

1. WER: each pipeline transcribes every clip (greedy, "Transcribe the input speech."); answers
   lose AF3's fixed preamble (`strip_transcription_prefix`), then reference and hypothesis go
   through the Whisper English normalizer (transformers' `EnglishTextNormalizer`; pass Whisper's
   `normalizer.json` with --spelling-mapping for its British->American spellings) and jiwer scores
   the corpus WER (errors over all reference words).
2. Teacher-forced logits: the candidate reads the reference's greedy answer token by token; per
   position, top-1 agreement (argmax equal) and KL(reference || candidate) of the next-token
   distributions. Decoders that expose no logits (TensorRT-LLM) are recorded as skipped.

DIR holds `manifest.jsonl` ({"audio": "a.wav", "text": "..."} per line, paths relative to DIR) or
audio files with a same-named `.txt` transcript beside each. Without --data the reference must be
"tiny": the folder is made from the bundled clip (af3trt/assets/speech.wav + SPEECH_TEXT).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from af3trt.prompt import DEFAULT_TRANSCRIBE_PROMPT, strip_transcription_prefix  # noqa: E402

SCHEMA = "af3trt.accuracy/1"
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


@dataclass(frozen=True)
class Item:
    audio: Path
    text: str


def load_items(data_dir: str | Path) -> list[Item]:
    """Clips and reference transcripts of DIR (manifest.jsonl, or audio files with .txt beside them)."""
    root = Path(data_dir)
    manifest = root / "manifest.jsonl"
    if manifest.is_file():
        items = []
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if line.strip():
                entry = json.loads(line)
                if not {"audio", "text"} <= set(entry):
                    raise ValueError(f"{manifest}:{n}: expected keys 'audio' and 'text', got {sorted(entry)}")
                items.append(Item(root / entry["audio"], str(entry["text"])))
    else:
        audios = sorted(p for p in root.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        missing = [p.name for p in audios if not p.with_suffix(".txt").is_file()]
        if missing:
            raise FileNotFoundError(f"expected a .txt transcript beside each audio in {root}, missing for {missing[:5]}")
        items = [Item(p, p.with_suffix(".txt").read_text().strip()) for p in audios]
    if not items:
        raise FileNotFoundError(f"expected manifest.jsonl or audio files + .txt transcripts in {root}, found none")
    return items


def make_tiny_data(out_dir: str | Path) -> Path:
    """The smoke-test folder: the bundled espeak-ng clip and its text."""
    from af3trt.assets import SPEECH_TEXT, SPEECH_WAV

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SPEECH_WAV, out / "speech.wav")
    (out / "speech.txt").write_text(SPEECH_TEXT + "\n")
    return out


def english_normalizer(spelling_mapping: str | Path | None = None):
    """Whisper's English normalizer; the spelling map is Whisper's normalizer.json (empty without it)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = json.loads(Path(spelling_mapping).read_text()) if spelling_mapping else {}
    return EnglishTextNormalizer(mapping)


def corpus_wer(references: list[str], hypotheses: list[str], normalize) -> dict:
    """Corpus WER after normalization; pairs whose normalized reference is empty are left out."""
    import jiwer

    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses)]
    kept = [(r, h) for r, h in pairs if r.strip()]
    if not kept:
        raise ValueError(f"expected at least one non-empty normalized reference, got {len(pairs)} empty ones")
    out = jiwer.process_words([r for r, _ in kept], [h for _, h in kept])
    words = out.hits + out.substitutions + out.deletions
    return {"wer": out.wer, "reference_words": words, "substitutions": out.substitutions,
            "deletions": out.deletions, "insertions": out.insertions, "dropped_empty_references": len(pairs) - len(kept)}


def conversation(audio: Path) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": str(audio)},
                                         {"type": "text", "text": DEFAULT_TRANSCRIBE_PROMPT}]}]


def transcribe(pipe, items: list[Item], max_new_tokens: int) -> list[dict]:
    """Greedy answers, one request per clip: raw text, stripped hypothesis and token ids."""
    out = []
    for item in items:
        r = pipe.generate(conversation(item.audio), max_new_tokens=max_new_tokens, do_sample=False)[0]  # greedy WER
        out.append({"raw": r.text, "hypothesis": strip_transcription_prefix(r.text), "token_ids": r.token_ids})
    return out


@torch.inference_mode()
def teacher_forced_logits(pipe, conv, answer_ids: list[int]) -> torch.Tensor:
    """(N, V) float32 next-token logits at each answer position, the answer fed as input.

    A decoder with `prefill` / `decode` (FastTorchDecoder) is driven step by step, through the same
    decode path generation takes; af3trt's TorchDecoder runs one forward over prompt + answer."""
    dec = pipe.decoder
    prompts = pipe.prepare([conv])
    reqs, _ = pipe.requests(prompts, pipe.options(max_new_tokens=max(1, len(answer_ids))))
    if hasattr(dec, "prefill") and hasattr(dec, "decode"):
        rows = [dec.prefill(reqs)[0].float().clone()]
        for tok in answer_ids[:-1]:
            rows.append(dec.decode(torch.tensor([tok], device=dec.device))[0].float().clone())
        return torch.stack(rows)
    module = getattr(dec, "module", None)
    if module is None or not hasattr(module, "embed"):
        raise NotImplementedError(f"decoder {getattr(dec, 'name', type(dec).__name__)!r} exposes no logits")
    ids = np.concatenate([reqs[0].input_ids, np.asarray(answer_ids[:-1], dtype=np.int64)])
    ids = torch.as_tensor(ids, device=dec.device)[None]
    table = reqs[0].table.to(dec.device, dec.dtype) if reqs[0].table.shape[0] else None
    x = module.embed(ids, table, None)
    n = ids.shape[1]
    cache = module.new_cache(1, n, dec.dtype, dec.device)
    logits = module(x, torch.arange(n, device=dec.device)[None], cache, 0, None, last_only=False)[0]
    return logits[n - len(answer_ids):].float()


def logit_agreement(reference, candidate, items: list[Item], answers: list[list[int]]) -> dict:
    """Top-1 agreement and KL(reference || candidate) over every teacher-forced answer position."""
    agree, kls = [], []
    for item, answer in zip(items, answers):
        if not answer:
            continue
        conv = conversation(item.audio)
        ref = teacher_forced_logits(reference, conv, answer).cpu()
        cand = teacher_forced_logits(candidate, conv, answer).cpu()
        if ref.shape != cand.shape:
            raise ValueError(f"expected equal logit shapes of both pipelines, got {tuple(ref.shape)} vs {tuple(cand.shape)}")
        agree.append((ref.argmax(-1) == cand.argmax(-1)).double())
        lp, lq = ref.double().log_softmax(-1), cand.double().log_softmax(-1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
    if not agree:
        raise ValueError("expected at least one non-empty reference answer to teacher-force, got none")
    a, k = torch.cat(agree), torch.cat(kls)
    return {"positions": int(a.numel()), "top1_agreement": float(a.mean()), "kl_mean": float(k.mean()),
            "kl_p90": float(torch.quantile(k, 0.9)), "kl_max": float(k.max())}


def load_pipeline(path: str, encoder: str, decoder: str, dtype: str | None, device: str | None, precision: str | None):
    """af3trt Pipeline; precision "fp8" swaps in the FastTorchDecoder with weight-only FP8 linears
    (quantized from the torch decoder's weights), "fast" the same decoder in the model dtype."""
    from af3trt.benchmark.backends import fast_decoder, fast_unavailable, with_decoder
    from af3trt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(path, encoder=encoder, decoder=decoder, device=device, dtype=dtype)
    if precision in (None, "", "auto"):
        return pipe
    if precision not in ("fp8", "fast"):
        raise ValueError(f"expected --*-precision fp8, fast or auto, got {precision!r}")
    reason = fast_unavailable(fp8=precision == "fp8")
    if reason:
        raise ValueError(reason)
    return with_decoder(pipe, fast_decoder(pipe.decoder, fp8=precision == "fp8"))


def _describe(args, role: str) -> dict:
    return {k: getattr(args, f"{role}_{k}") for k in ("model", "encoder", "decoder", "dtype", "precision")}


def run_accuracy(args) -> dict:
    from af3trt.benchmark.env import environment

    if args.data is None and args.reference_model != "tiny":
        raise ValueError(f"expected --data DIR (or --reference-model tiny for the smoke test), got "
                         f"reference {args.reference_model!r} without data")
    data = Path(args.data) if args.data else make_tiny_data(Path(args.out).with_suffix("").parent / "accuracy_tiny_data")
    items = load_items(data)
    normalize = english_normalizer(args.spelling_mapping)
    result = {"schema": SCHEMA, "env": environment(), "data": {"dir": str(data), "items": len(items)},
              "normalizer": {"name": "transformers EnglishTextNormalizer",
                             "spelling_mapping": args.spelling_mapping or "none (empty map)"},
              "max_new_tokens": args.max_new_tokens}
    refs = [it.text for it in items]
    outputs = {}
    for role in ("reference", "candidate"):
        d = _describe(args, role)
        pipe = load_pipeline(d["model"], d["encoder"], d["decoder"], d["dtype"], args.device, d["precision"])
        outputs[role] = (pipe, transcribe(pipe, items, args.max_new_tokens))
        hyps = [o["hypothesis"] for o in outputs[role][1]]
        result[role] = {**d, "decoder_backend": getattr(pipe.decoder, "name", "?"),
                        **corpus_wer(refs, hyps, normalize)}
    result["delta_wer"] = result["candidate"]["wer"] - result["reference"]["wer"]
    try:
        answers = [o["token_ids"] for o in outputs["reference"][1]]
        result["logits"] = logit_agreement(outputs["reference"][0], outputs["candidate"][0], items, answers)
    except NotImplementedError as exc:
        result["logits"] = {"status": f"skipped: {exc}"}
    result["samples"] = [{"audio": str(it.audio), "reference": it.text, "reference_hypothesis": r["hypothesis"],
                          "candidate_hypothesis": c["hypothesis"]}
                         for it, r, c in zip(items, outputs["reference"][1], outputs["candidate"][1])]
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder of audio + transcripts (default: tiny smoke folder)")
    for role, dtype in (("reference", None), ("candidate", None)):
        p.add_argument(f"--{role}", dest=f"{role}_model", default="tiny", help="checkpoint dir, engine dir or 'tiny'")
        p.add_argument(f"--{role}-encoder", default="auto")
        p.add_argument(f"--{role}-decoder", default="auto")
        p.add_argument(f"--{role}-dtype", default=dtype, help="bfloat16 | float16 | float32 (default per device)")
        p.add_argument(f"--{role}-precision", default=None,
                       help="fp8: FastTorchDecoder with FP8 linears; fast: FastTorchDecoder in the model dtype")
    p.add_argument("--device", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--spelling-mapping", default=None, help="Whisper normalizer.json (British->American map)")
    p.add_argument("--out", required=True, help="results JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from af3trt.benchmark.report import write_json

    try:
        result = run_accuracy(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"accuracy.py: error: {exc}", file=sys.stderr)
        return 2
    write_json(result, args.out)
    ref, cand, logits = result["reference"], result["candidate"], result["logits"]
    print(f"WER reference {ref['wer']:.4f}, candidate {cand['wer']:.4f} (delta {result['delta_wer']:+.4f}) over "
          f"{ref['reference_words']} words; logits: {json.dumps(logits)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
