"""LTX-2 text connectors (diffusers' ``LTX2TextConnectors``, a class local to its LTX-2 pipelines).

Gemma's hidden states of *every* layer, stacked (B, S, 3840, 49), become the DiT's text context: LTX-2.0
normalises each layer over the valid tokens (masked mean and range, times 8) and projects the flattened
stack with one ``text_proj_in``; LTX-2.3 RMS-normalises per token and has one projection per modality.
Then one small 1-D transformer per modality runs over the sequence with its padding replaced by learned
registers (the valid tokens moved to the front in order), so the DiT sees no padding at all.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from diffcore.models.base import ModelMixin
from diffcore.models.dit import FeedForward
from diffcore.models.linear import Linear

from .attention import LTX2Attention, rms, rope_tables


def masked_layer_norm(states: torch.Tensor, lengths: torch.Tensor, padding_side: str = "left",
                      scale: float = 8.0, eps: float = 1e-6) -> torch.Tensor:
    """LTX-2.0: per sample and layer, (x - mean) / (max - min) over the valid tokens, times ``scale``;
    (B, S, D, L) -> (B, S, D * L) with padding zeroed."""
    b, s, d, layers = states.shape
    pos = torch.arange(s, device=states.device)[None]
    valid = pos >= (s - lengths[:, None]) if padding_side == "left" else pos < lengths[:, None]
    valid = valid[:, :, None, None]
    mean = states.masked_fill(~valid, 0.0).sum(dim=(1, 2), keepdim=True) / ((lengths * d).view(b, 1, 1, 1) + eps)
    lo = states.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)
    hi = states.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    out = ((states - mean) / (hi - lo + eps) * scale).flatten(2)
    return out.masked_fill(~valid.squeeze(-1), 0.0).to(states.dtype)


class ConnectorBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, gated: bool):
        super().__init__()
        self.attn1 = LTX2Attention(dim, heads, head_dim, gated=gated)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], rope) -> torch.Tensor:
        x = x + self.attn1(rms(x), mask=mask, q_rope=rope)
        return x + self.ff(rms(x))


class ConnectorTransformer1d(nn.Module):
    def __init__(self, heads: int, head_dim: int, layers: int, registers: Optional[int], rope_base: int,
                 theta: float, double_precision: bool, rope_type: str, gated: bool):
        super().__init__()
        self.heads, self.dim = heads, heads * head_dim
        self.rope_base, self.theta, self.double, self.rope_type = rope_base, theta, double_precision, rope_type
        self.num_registers = registers
        self.learnable_registers = nn.Parameter(torch.rand(registers, self.dim) * 2 - 1) if registers else None
        self.transformer_blocks = nn.ModuleList([ConnectorBlock(self.dim, heads, head_dim, gated) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mask``: additive (B, 1, 1, S), 0 = valid. Returns the sequence and the mask it ended with."""
        b, s, _ = x.shape
        if self.learnable_registers is not None:
            if s % self.num_registers:
                from diffcore.errors import InputError

                raise InputError(f"max_sequence_length={s} must be a multiple of the connector's "
                                 f"{self.num_registers} registers")
            registers = self.learnable_registers.repeat(s // self.num_registers, 1)
            keep = (mask.reshape(b, s) >= -9000.0).long()
            order = torch.argsort(1 - keep, dim=1, stable=True)  # valid tokens first, in order
            front = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            filled = torch.arange(s, device=x.device)[None] < keep.sum(dim=1, keepdim=True)
            x = torch.where(filled.unsqueeze(-1), front, registers[None].to(x.dtype))
            mask = torch.zeros_like(mask)
        grid = (torch.arange(s, dtype=torch.float32, device=x.device) / self.rope_base)[None, :, None].repeat(b, 1, 1)
        rope = rope_tables(grid, self.dim, self.theta, self.heads, self.rope_type, self.double)
        for block in self.transformer_blocks:
            x = block(x, mask, rope)
        return rms(x), mask


class LTX2TextConnectors(ModelMixin):
    diffusers_class_name = "LTX2TextConnectors"

    def __init__(self, caption_channels: int = 3840, text_proj_in_factor: int = 49,
                 video_connector_num_attention_heads: int = 30, video_connector_attention_head_dim: int = 128,
                 video_connector_num_layers: int = 2, video_connector_num_learnable_registers: Optional[int] = 128,
                 video_gated_attn: bool = False, audio_connector_num_attention_heads: int = 30,
                 audio_connector_attention_head_dim: int = 128, audio_connector_num_layers: int = 2,
                 audio_connector_num_learnable_registers: Optional[int] = 128, audio_gated_attn: bool = False,
                 connector_rope_base_seq_len: int = 4096, rope_theta: float = 10000.0,
                 rope_double_precision: bool = True, causal_temporal_positioning: bool = False,
                 rope_type: str = "interleaved", per_modality_projections: bool = False, video_hidden_dim: int = 4096,
                 audio_hidden_dim: int = 2048, proj_bias: bool = False):
        super().__init__()
        self.caption_channels, self.per_modality = caption_channels, per_modality_projections
        self.video_scale = math.sqrt(video_hidden_dim / caption_channels)
        self.audio_scale = math.sqrt(audio_hidden_dim / caption_channels)
        features = caption_channels * text_proj_in_factor
        if per_modality_projections:
            self.video_text_proj_in = Linear(features, video_hidden_dim, bias=proj_bias)
            self.audio_text_proj_in = Linear(features, audio_hidden_dim, bias=proj_bias)
        else:
            self.text_proj_in = Linear(features, caption_channels, bias=proj_bias)
        common = dict(rope_base=connector_rope_base_seq_len, theta=rope_theta,
                      double_precision=rope_double_precision, rope_type=rope_type)
        self.video_connector = ConnectorTransformer1d(
            video_connector_num_attention_heads, video_connector_attention_head_dim, video_connector_num_layers,
            video_connector_num_learnable_registers, gated=video_gated_attn, **common)
        self.audio_connector = ConnectorTransformer1d(
            audio_connector_num_attention_heads, audio_connector_attention_head_dim, audio_connector_num_layers,
            audio_connector_num_learnable_registers, gated=audio_gated_attn, **common)

    def forward(self, text_encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                padding_side: str = "left", scale_factor: float = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(video context, audio context, their (B, S) keep-mask) from stacked hidden states (B, S, D * L)
        or (B, S, D, L) and the tokenizer's mask."""
        states = text_encoder_hidden_states
        if states.ndim == 3:
            states = states.unflatten(2, (self.caption_channels, -1))
        if self.per_modality:  # LTX-2.3
            normed = (states * torch.rsqrt(states.pow(2).mean(dim=2, keepdim=True) + 1e-6)).flatten(2, 3)
            normed = torch.where(attention_mask.bool().unsqueeze(-1), normed, torch.zeros_like(normed))
            video = self.video_text_proj_in(normed * self.video_scale)
            audio = self.audio_text_proj_in(normed * self.audio_scale)
        else:  # LTX-2.0
            video = audio = self.text_proj_in(masked_layer_norm(states, attention_mask.sum(dim=-1), padding_side,
                                                                scale_factor))
        dtype = video.dtype
        additive = ((attention_mask.long() - 1).to(dtype) * torch.finfo(dtype).max)[:, None, None, :]
        video_ctx, video_mask = self.video_connector(video, additive)
        keep = (video_mask < 1e-6).long().reshape(video_ctx.shape[0], video_ctx.shape[1], 1)
        audio_ctx, _ = self.audio_connector(audio, additive)
        return video_ctx * keep, audio_ctx, keep.squeeze(-1)
