"""LTX2Transformer2DModel: a small diffusion transformer (DiT) over VAE latents.

    latents (B, C, H, W) --pos_embed--> tokens (B, H/p * W/p, D) + fixed 2-D sin-cos positions
    t, pooled text --time_text_embed--> temb (B, D)
    text states (B, L, joint_attention_dim) --context_embedder--> (B, L, D)
    transformer_blocks: AdaLN-Zero self-attention, cross-attention to the text, AdaLN-Zero MLP
    norm_out (AdaLN) -> proj_out -> unpatchify -> velocity prediction (B, C, H, W)

Parameter names follow Diffusers' DiT / PixArt / FLUX modules (``pos_embed.proj``,
``time_text_embed.timestep_embedder.linear_1``, ``attn1.to_q``, ``ff.net.0.proj``, ``norm_out.linear``,
``proj_out``), so checkpoints look like Diffusers ones. Attention goes through diffcore's dispatch,
so attention backends (and sequence parallelism) apply to this model unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.models.attention import attention
from diffcore.models.base import ModelMixin
from diffcore.models.embeddings import TimestepEmbedding, timestep_embedding
from diffcore.models.linear import Linear  # nn.Linear with the CPU fast path; LoRA adapters apply to these


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift


def sincos_positions(dim: int, h: int, w: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos table (h * w, dim), as in MAE / DiT: half the channels encode the row, half the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    parts = []
    for pos in (rows, cols):
        angles = torch.outer(pos, omega)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, plus positions (cached per grid size: computed once, not per step)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"the model width ({dim}) must be a multiple of 4 for 2-D sin-cos positions")
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self._positions: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        _, d, h, w = x.shape
        key = (h, w, x.device, x.dtype)
        if key not in self._positions:
            self._positions[key] = sincos_positions(d, h, w, x.device).to(x.dtype)
        return x.flatten(2).transpose(1, 2) + self._positions[key]


class TimeTextEmbedding(nn.Module):
    """``temb = MLP(sinusoid(t)) + MLP(pooled text)`` (Diffusers' CombinedTimestepTextProjEmbeddings)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # same linear_1 / act / linear_2 layout

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0).to(pooled.dtype)
        return self.timestep_embedder(freqs) + self.text_embedder(pooled)


class Attention(nn.Module):
    """Multi-head attention with QK-RMSNorm (keeps logits bounded, as in FLUX / SD3); self-attention
    when ``context`` is None, cross-attention to ``context`` otherwise."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        self.to_out = nn.ModuleList([Linear(inner, dim), nn.Identity()])  # Diffusers: [linear, dropout]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if context is None else context
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(kv).unflatten(-1, (self.heads, -1)))
        v = self.to_v(kv).unflatten(-1, (self.heads, -1))
        return self.to_out[0](attention(q, k, v).flatten(2).to(x.dtype))


class GELU(nn.Module):
    """Linear + tanh-GELU (Diffusers' ``GELU`` activation module, the ``proj`` in ``net.0.proj``)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """MLP named like Diffusers' FeedForward: ``net.0.proj``, ``net.2`` (``net.1`` is a parameter-free dropout)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, inner), nn.Identity(), Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class AdaLNModulation(nn.Module):
    """``linear(silu(temb))`` split into ``n`` per-sample (B, 1, D) shift / scale / gate vectors."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = Linear(dim, n * dim)

    def forward(self, temb_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(temb_act).unsqueeze(1).chunk(self.n, dim=-1)


class LTX2TransformerBlock(nn.Module):
    """DiT block: AdaLN-Zero self-attention, cross-attention to the text, AdaLN-Zero MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = AdaLNModulation(dim, 6)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn2 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb_act)
        x = x + gate_msa * self.attn1(_modulate(x, shift_msa, scale_msa))
        x = x + self.attn2(self.norm2(x), context)
        return x + gate_mlp * self.ff(_modulate(x, shift_mlp, scale_mlp))


class LTX2Transformer2DModel(ModelMixin):
    """Velocity prediction for flow matching. ``timestep`` is ``t / 1000`` in [0, 1] (diffcore's default
    ``model_timestep``); the model scales it back to [0, 1000] for the sinusoidal embedding."""

    diffusers_class_name = "LTX2Transformer2DModel"

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 64,
        joint_attention_dim: int = 768,
        pooled_projection_dim: int = 768,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels or in_channels
        dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(in_channels, dim, patch_size)
        self.time_text_embed = TimeTextEmbedding(dim, pooled_projection_dim)
        self.context_embedder = Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [LTX2TransformerBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio)
             for _ in range(num_layers)]
        )
        self.norm_out = AdaLNModulation(dim, 2)  # (scale, shift), Diffusers' AdaLayerNormContinuous order
        self.proj_out = Linear(dim, patch_size * patch_size * self.out_channels)
        self._zero_init()

    def _zero_init(self) -> None:
        """adaLN-Zero (DiT): residual gates and the output start at zero, so training starts from identity."""
        if self.proj_out.weight.is_meta:  # built by the loader: the checkpoint supplies every weight
            return
        for layer in [*(b.norm1.linear for b in self.transformer_blocks), self.proj_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        b, _, h, w = hidden_states.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        x = self.pos_embed(hidden_states)
        t = timestep.to(x.dtype).reshape(-1).expand(b) * 1000
        temb_act = F.silu(self.time_text_embed(t, pooled_projections.to(x.dtype)))
        context = self.context_embedder(encoder_hidden_states.to(x.dtype))
        for block in self.transformer_blocks:
            x = block(x, context, temb_act)
        scale, shift = self.norm_out(temb_act)
        x = self.proj_out(_modulate(x, shift, scale))
        # unpatchify: (B, h*w, p*p*C) -> (B, C, h*p, w*p)
        x = x.view(b, h // p, w // p, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, self.out_channels, h, w)
