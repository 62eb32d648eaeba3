"""Audio encoder + projector: (W, 128, 3000) log-mel windows -> (W, 750, hidden) embeddings.

`AudioEncoder` is af3trt's own torch module of AF3's audio path (Whisper conv front end, pre-LN
transformer layers with a key-padding mask, AvgPool1d(2), LayerNorm, 2-layer GELU projector); its
parameter names are the checkpoint's (`audio_tower.*` without prefix, `projector.*`). Backends share
one interface: `backend(features, mask) -> (W, 750, hidden)` where rows past a window's valid
count are padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import AudioSpec, ModelSpec, audio_token_count


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d)
        self.self_attn.k_proj = nn.Linear(d, d, bias=False)
        self.self_attn.v_proj = nn.Linear(d, d)
        self.self_attn.out_proj = nn.Linear(d, d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (W, S, d); bias (W, 1, 1, S) additive key mask (0 valid, -inf padding)."""
        w, s, d = x.shape
        h = self.self_attn_layer_norm(x)
        a = self.self_attn

        def heads(t):
            return t.view(w, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(a.q_proj(h)), heads(a.k_proj(h)), heads(a.v_proj(h))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + a.out_proj(o.transpose(1, 2).reshape(w, s, d))
        h = self.final_layer_norm(x)
        return x + self.fc2(F.gelu(self.fc1(h)))


class AudioEncoder(nn.Module):
    """AF3 audio tower + projector. forward(features (W,128,3000) float, frames (W,) int) -> (W, 750, H)."""

    def __init__(self, audio: AudioSpec, text_hidden: int, projector_bias: bool = True):
        super().__init__()
        if audio.activation != "gelu":
            raise ValueError(f"expected the audio encoder's activation 'gelu', got {audio.activation!r}")
        d = audio.hidden_size
        self.spec = audio
        self.conv1 = nn.Conv1d(audio.num_mel_bins, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(audio.max_source_positions, d)
        self.layers = nn.ModuleList(
            EncoderLayer(d, audio.num_heads, audio.intermediate_size) for _ in range(audio.num_layers)
        )
        self.layer_norm = nn.LayerNorm(d)
        self.projector = nn.Module()
        self.projector.linear_1 = nn.Linear(d, text_hidden, bias=projector_bias)
        self.projector.linear_2 = nn.Linear(text_hidden, text_hidden, bias=projector_bias)

    @classmethod
    def from_checkpoint(cls, ckpt, dtype=torch.float32) -> "AudioEncoder":
        from ..checkpoint import ENCODER_PREFIX, PROJECTOR_PREFIX

        spec: ModelSpec = ckpt.spec
        model = cls(spec.audio, spec.text.hidden_size, spec.projector_bias)
        state = ckpt.load(ENCODER_PREFIX)
        state.update({f"projector.{k}": v for k, v in ckpt.load(PROJECTOR_PREFIX).items()})
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (W, 1500, d)
        x = x + self.embed_positions.weight[: x.shape[1]]
        valid = (frames.to(torch.long) - 1) // 2 + 1  # conv2 positions holding real frames
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, -math.inf)
        bias = bias[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)  # (W, 750, d)
        x = self.layer_norm(x)
        return self.projector.linear_2(F.gelu(self.projector.linear_1(x)))


def valid_rows(frames) -> list[int]:
    """Valid embedding rows per window for (W,) valid mel frames."""
    return [int(audio_token_count(int(f))) for f in frames]


class TorchEncoder:
    """Encoder backend on af3trt's torch module. __call__(features, frames) -> (W, 750, H) tensor."""

    name = "torch"

    def __init__(self, module: AudioEncoder, device: str | torch.device = "cpu", max_windows_per_call: int = 8):
        self.module = module.to(device)
        self.device = torch.device(device)
        self.dtype = next(module.parameters()).dtype
        self.max_windows_per_call = max_windows_per_call

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu", dtype=torch.float32) -> "TorchEncoder":
        return cls(AudioEncoder.from_checkpoint(ckpt, dtype), device)

    @torch.inference_mode()
    def __call__(self, features, frames) -> torch.Tensor:
        feats = torch.as_tensor(features, device=self.device, dtype=self.dtype)
        frames = torch.as_tensor(frames, device=self.device)
        outs = [
            self.module(feats[i : i + self.max_windows_per_call], frames[i : i + self.max_windows_per_call])
            for i in range(0, feats.shape[0], self.max_windows_per_call)
        ]
        return torch.cat(outs) if outs else feats.new_zeros((0, 0, 0))
