"""Conversations -> prompt token ids with `<sound>` expansion and prompt-table (fake) ids.

Conversation format (the HF processor's): a list of messages `{"role": "system"|"user"|"assistant",
"content": str | list[item]}`, an item being `{"type": "text", "text": str}` or `{"type": "audio",
"audio": path | bytes | array}` (`"path"` is accepted for `"audio"`; arrays are 16 kHz unless the
item gives `"sampling_rate"`). Like AF3's chat template, a message's audio placeholders come
before its text. Unlike HF and vLLM, any number of audios per message and per conversation work:
each audio's `<sound>` expands to its own token count and reads its own rows of the prompt table.

Stitching contract (TensorRT-LLM prompt tuning, DESIGN §4): the audio embeddings of a request,
in prompt order, form its prompt table `[rows, hidden]`; each placeholder becomes the fake id
`vocab_size + row`. Every decoder backend consumes exactly these ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import Audio, AudioError, load_audio
from .errors import UserError
from .spec import MIN_AUDIO_SAMPLES, SAMPLE_RATE, audio_tokens_for_samples

ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_TRANSCRIBE_PROMPT = "Transcribe the input speech."
TRANSCRIPTION_PREFIXES = (
    "The spoken content of the audio is",
    "The transcription of the audio is",
    "The content of the input audio is",
)


class PromptError(UserError):
    """A conversation that does not follow the format, or a prompt past a limit."""


def num_audio_tokens(num_samples: int) -> int:
    """Prompt-table rows of an audio of `num_samples` 16 kHz samples (≤ 10 min): `spec.audio_tokens_for_samples`."""
    return audio_tokens_for_samples(num_samples)


@dataclass
class Prompt:
    """One conversation, rendered.

    input_ids: token ids with each audio's placeholders already expanded (audio_token_id);
    audios: the decoded audios in prompt order; audio_tokens: rows each contributes to the table.
    """

    input_ids: list[int]
    audios: list[Audio] = field(default_factory=list)
    audio_tokens: list[int] = field(default_factory=list)
    text: str = ""

    @property
    def num_audio_tokens(self) -> int:
        return sum(self.audio_tokens)


def _audio_source(item: dict, where: str):
    for key in ("audio", "path"):
        if key in item:
            return item[key]
    if "url" in item:
        return item["url"]
    raise PromptError(f"expected an 'audio' (path, bytes or array) in {where}, got keys {sorted(item)}")


def normalize_conversation(conversation) -> list[dict]:
    """Validate a conversation; returns messages whose content is a list of typed items."""
    if isinstance(conversation, dict):
        conversation = [conversation]
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise PromptError(f"expected a non-empty list of messages, got {type(conversation).__name__}")
    messages = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise PromptError(f"expected message {i} as {{'role', 'content'}}, got {msg!r:.80}")
        if msg["role"] not in ROLES:
            raise PromptError(f"expected message {i} role in {ROLES}, got {msg['role']!r}")
        content = msg["content"]
        if content is None:
            continue
        if isinstance(content, str):
            items = [{"type": "text", "text": content}]
        elif isinstance(content, (list, tuple)):
            items = []
            for j, item in enumerate(content):
                where = f"message {i} item {j}"
                kind = item.get("type") if isinstance(item, dict) else None
                if kind is None and isinstance(item, dict):
                    kind = "audio" if ({"audio", "path", "url"} & set(item)) else ("text" if "text" in item else None)
                if kind == "text" and isinstance(item.get("text"), str):
                    items.append({"type": "text", "text": item["text"]})
                elif kind == "audio":
                    items.append({**item, "type": "audio", "audio": _audio_source(item, where)})
                else:
                    raise PromptError(f"expected {where} as {{'type': 'text'|'audio', ...}}, got {item!r:.80}")
        else:
            raise PromptError(f"expected message {i} content as str or list, got {type(content).__name__}")
        messages.append({"role": msg["role"], "content": items, "string": isinstance(content, str)})
    if not messages:
        raise PromptError("expected at least one message with content, got none")
    return messages


def audio_references(conversation) -> tuple[list[dict], list]:
    """A conversation -> (the same conversation with each audio item's source replaced by its index,
    the sources in prompt order): the CONVERSATION + AUDIO form of the Triton repository's request.
    Sources are what the items held (bytes, paths, arrays); the messages are otherwise unchanged."""
    sources: list = []
    out = []
    for msg in normalize_conversation(conversation):
        items = []
        for item in msg["content"]:
            if item["type"] == "audio":
                items.append({"type": "audio", "audio": len(sources)})
                sources.append(item["audio"])
            else:
                items.append(item)
        out.append({"role": msg["role"], "content": msg["content"][0]["text"] if msg["string"] else items})
    return out, sources


def resolve_audio_references(conversation, audios: list, name: str = "AUDIO") -> list[dict]:
    """Inverse of `audio_references`: each audio item {"type": "audio", "audio": i} gets `audios[i]`.
    Every element of `audios` must be referenced (none is silently dropped); `name` names the list in
    errors."""
    used: set[int] = set()
    out = []
    for i, msg in enumerate(normalize_conversation(conversation)):
        items = []
        for j, item in enumerate(msg["content"]):
            if item["type"] == "audio":
                ref = item["audio"]
                if not isinstance(ref, int) or isinstance(ref, bool) or not 0 <= ref < len(audios):
                    raise PromptError(f"expected message {i} item {j} audio as an index into {name} "
                                      f"(0..{len(audios) - 1}), got {ref!r:.40}" if audios else
                                      f"expected message {i} item {j} audio as an index into {name}, got {ref!r:.40} "
                                      f"and no {name}")
                used.add(ref)
                item = {"type": "audio", "audio": audios[ref]}
            items.append(item)
        out.append({"role": msg["role"], "content": items})
    unused = sorted(set(range(len(audios))) - used)
    if unused:
        raise PromptError(f"expected every {name} element referenced by an audio item of the conversation, got "
                          f"{name}{unused} unreferenced")
    return out


def append_to_last_user(messages: list[dict], suffix: str) -> list[dict]:
    """Normalized messages with `suffix` ending the last user turn's text (after one space; no text:
    the suffix alone), as AF3-Think's harnesses write `user_text + " " + suffix`. A turn that
    already ends with it is left as is; "" changes nothing."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not suffix or not users:
        return messages
    msg = messages[users[-1]]
    text = "".join(it["text"] for it in msg["content"] if it["type"] == "text")
    if text.endswith(suffix):
        return messages
    extra = {"type": "text", "text": (" " if text else "") + suffix}
    return messages[: users[-1]] + [{**msg, "content": msg["content"] + [extra]}] + messages[users[-1] + 1:]


def render(messages: list[dict], sound_token: str = "<sound>", add_generation_prompt: bool = True) -> str:
    """AF3 chat template: ChatML turns, default system turn, one `<sound>` per audio before the text."""
    parts = []
    if messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for msg in messages:
        audios = sum(1 for it in msg["content"] if it["type"] == "audio")
        text = "".join(it["text"] for it in msg["content"] if it["type"] == "text")
        parts.append(f"<|im_start|>{msg['role']}\n{sound_token * audios}{text}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class PromptBuilder:
    """Turns conversations into `Prompt`s with one tokenizer (from the checkpoint or engine dir)."""

    def __init__(self, tokenizer, audio_token_id: int, vocab_size: int, allow_urls: bool = False,
                 user_suffix: str = ""):
        self.tokenizer = tokenizer
        self.user_suffix = user_suffix  # appended to the last user turn (AF3-Think's instruction), "" = none
        self.audio_token_id = int(audio_token_id)
        self.vocab_size = int(vocab_size)
        self.allow_urls = allow_urls
        self.sound_token = tokenizer.convert_ids_to_tokens(self.audio_token_id)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, audio_token_id: int, vocab_size: int, **kw) -> "PromptBuilder":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), audio_token_id, vocab_size, **kw)

    def build(self, conversation, add_generation_prompt: bool = True, audio_loader=None) -> Prompt:
        """Render, tokenize and expand one conversation; audios are decoded here (or by `audio_loader`)."""
        messages = append_to_last_user(normalize_conversation(conversation), self.user_suffix)
        load = audio_loader or self.load_audio
        audios = [load(it) for m in messages for it in m["content"] if it["type"] == "audio"]
        text = render(messages, self.sound_token, add_generation_prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        placeholders = sum(1 for t in ids if t == self.audio_token_id)
        if placeholders != len(audios):
            raise PromptError(
                f"expected {len(audios)} {self.sound_token} placeholders for {len(audios)} audios, got "
                f"{placeholders} (is the text itself writing {self.sound_token}?)"
            )
        counts = [num_audio_tokens(a.samples.shape[0]) for a in audios]
        for audio, count in zip(audios, counts):
            if count == 0:
                raise AudioError(
                    f"expected at least {MIN_AUDIO_SAMPLES} samples ({MIN_AUDIO_SAMPLES * 1000 / SAMPLE_RATE:.0f} ms) of audio for one "
                    f"audio token, got {audio.samples.shape[0]} samples from {audio.source}"
                )
        expanded: list[int] = []
        k = 0
        for t in ids:
            if t == self.audio_token_id:
                expanded.extend([t] * counts[k])
                k += 1
            else:
                expanded.append(t)
        return Prompt(expanded, audios, counts, text)

    def load_audio(self, item: dict) -> Audio:
        src = item["audio"]
        if isinstance(src, Audio):
            return src
        return load_audio(src, item.get("sampling_rate"), allow_urls=self.allow_urls)

    def fake_ids(self, prompt: Prompt) -> np.ndarray:
        """(T,) int64 ids where the r-th placeholder is `vocab_size + r` (TensorRT-LLM prompt tuning)."""
        return fake_ids(prompt.input_ids, self.audio_token_id, self.vocab_size)


def fake_ids(input_ids, audio_token_id: int, vocab_size: int) -> np.ndarray:
    """Replace placeholders in (T,) ids by `vocab_size + row`, rows counted in prompt order."""
    ids = np.asarray(input_ids, dtype=np.int64).copy()
    where = ids == audio_token_id
    ids[where] = vocab_size + np.arange(int(where.sum()), dtype=np.int64)
    return ids


def left_pad(sequences: list[list[int]] | list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad (B,) sequences: returns (B, T) int64 ids and (B, T) int64 attention mask."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s):] = np.asarray(s, dtype=np.int64)
            mask[i, width - len(s):] = 1
    return ids, mask


def strip_transcription_prefix(text: str) -> str:
    """Remove AF3's fixed transcription preamble, a trailing '.', and surrounding quotes."""
    s = text.strip()
    for prefix in TRANSCRIPTION_PREFIXES:
        if s.startswith(prefix):
            s = s[len(prefix):].strip()
            break
    if s.endswith("."):
        s = s[:-1].strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        s = s[1:-1].strip()
    return s
