"""The toy network and the small extras the toy plugin registers (scheduler, stage, attention, cache)."""
from __future__ import annotations

import torch
from torch import nn

from diffcore.models.attention import attention
from diffcore.models.base import ModelMixin
from diffcore.models.embeddings import TimestepEmbedding, Timesteps
from diffcore.models.linear import Linear
from diffcore.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler
from diffcore.stages.base import In, Out, PipelineStage

ATTENTION_CALLS = [0]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.heads
        q = self.to_q(x).unflatten(-1, (h, -1))
        k, v = self.to_k(context).unflatten(-1, (h, -1)), self.to_v(context).unflatten(-1, (h, -1))
        return self.to_out(attention(q, k, v).flatten(2))


class ToyBlock(nn.Module):
    """Self-attention, cross-attention to the text, MLP; the timestep modulates the first norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mod = Linear(dim, 2 * dim)
        self.attn1, self.attn2 = _Attention(dim, heads), _Attention(dim, heads)
        self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(nn.functional.silu(temb))[:, None].chunk(2, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class ToyTransformer2DModel(ModelMixin):
    """A tiny DiT over packed latent tokens (B, S, in_channels), conditioned on text and timestep."""

    diffusers_class_name = "ToyTransformer2DModel"

    def __init__(self, in_channels: int = 16, hidden_size: int = 32, num_heads: int = 2, num_layers: int = 1,
                 joint_attention_dim: int = 32, pooled_projection_dim: int = 32):
        super().__init__()
        self.proj_in = Linear(in_channels, hidden_size)
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(hidden_size, hidden_size)
        self.pooled_embed = Linear(pooled_projection_dim, hidden_size)
        self.context_in = Linear(joint_attention_dim, hidden_size)
        self.blocks = nn.ModuleList(ToyBlock(hidden_size, num_heads) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_size)
        self.proj_out = Linear(hidden_size, in_channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        dtype = hidden_states.dtype
        temb = self.time_embed(self.time_proj(timestep * 1000).to(dtype)) + self.pooled_embed(pooled_projections)
        x = self.proj_in(hidden_states)
        context = self.context_in(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, context, temb)
        return self.proj_out(self.norm_out(x))


class ToyFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """Registered under a plugin-specific name, to prove schedulers come through the hook."""

    diffusers_class_name = "ToyFlowScheduler"


class ToyNoopStage(PipelineStage):
    """A stage another plugin could compose; it reads latents and passes them on."""

    inputs = (In("latents", torch.Tensor),)
    outputs = (Out("latents", torch.Tensor),)

    def forward(self, req):
        return req


def counting_attention(query, key, value, attn_mask=None, scale=None):
    """An attention backend that counts its calls and computes plain softmax attention."""
    ATTENTION_CALLS[0] += 1
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


class ToyStepCache:
    """A step cache that reuses each branch's previous prediction on odd steps (skips half the calls)."""

    def __init__(self, threshold: float = 0.1):
        self.threshold, self.calls, self.skipped, self.last = threshold, 0, 0, {}

    def reset(self, num_steps: int) -> None:
        self.last = {}

    @property
    def stats(self) -> dict:
        return {"computed": self.calls, "skipped": self.skipped}

    def __call__(self, model, step: int, branch: str, **kwargs):
        if step % 2 == 1 and branch in self.last:
            self.skipped += 1
            return self.last[branch]
        self.calls += 1
        self.last[branch] = out = model(**kwargs)
        return out
