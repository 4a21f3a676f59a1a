"""The layers of Wan's video DiT (parameter names equal diffusers'): the timestep / text / image embedders,
attention with RMSNorm across heads, the AdaLN modulation tables and the transformer block.

AdaLN modulation is one ``layer_norm`` with the per-sample ``1 + scale`` / ``shift`` as its affine (batch 1;
``addcmul`` otherwise) and gated residuals are one ``addcmul``, in float32 like diffusers, rounded once to the
activation dtype; token-wise projections use ``diffcore.models.linear`` (oneDNN GEMMs on the CPU, the FFN's
GELU(tanh) fused into its first GEMM).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.models.attention import attention
from diffcore.models.embeddings import TimestepEmbedding, timestep_embedding
from diffcore.models.linear import Linear, linear

from .rope import Rope, apply_rope

KV = tuple[torch.Tensor, ...]  # one block's cross-attention (k, v) or (k, v, k_img, v_img), each (B, S, H, D)


def _fp32_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """diffusers' FP32LayerNorm: statistics and affine in float32, rounded once to ``x``'s dtype."""
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).to(x.dtype)


class _GELUProj(nn.Module):
    """``net.0`` of diffusers' FeedForward: a Linear followed by GELU (tanh: fused into the GEMM)."""

    def __init__(self, dim: int, inner: int, approximate: str):
        super().__init__()
        self.approximate = approximate
        self.proj = Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh":
            return linear(x, self.proj, "gelu_tanh")
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """GELU MLP with diffusers' ``net.0.proj`` / ``net.2`` names (``net.1`` is a parameter-free dropout)."""

    def __init__(self, dim: int, inner: int, out: Optional[int] = None, approximate: str = "tanh"):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, inner, approximate), nn.Identity(), Linear(inner, out or dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TextProjection(nn.Module):
    """Caption projection (diffusers PixArtAlphaTextProjection with GELU-tanh)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1 = Linear(in_features, hidden)
        self.linear_2 = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(linear(x, self.linear_1, "gelu_tanh"))


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: LN, GELU MLP, LN (LayerNorms in float32, eps 1e-5 as in diffusers).

    With ``pos_embed_seq_len`` (FLF2V) the two images' token sets are joined per sample and get a
    learned position embedding.
    """

    def __init__(self, in_features: int, out_features: int, pos_embed_seq_len: Optional[int] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_features)
        self.ff = FeedForward(in_features, in_features, out_features, approximate="none")
        self.norm2 = nn.LayerNorm(out_features)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_features)) if pos_embed_seq_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x.reshape(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed
        return _fp32_layer_norm(self.ff(_fp32_layer_norm(x, self.norm1)), self.norm2)


class WanTimeTextImageEmbedding(nn.Module):
    """Timestep MLP (+ 6-way modulation projection), text projection and optional image projection."""

    def __init__(self, dim: int, time_freq_dim: int, time_proj_dim: int, text_embed_dim: int,
                 image_embed_dim: Optional[int] = None, pos_embed_seq_len: Optional[int] = None):
        super().__init__()
        self.freq_dim = time_freq_dim
        self.time_embedder = TimestepEmbedding(time_freq_dim, dim)
        self.time_proj = Linear(dim, time_proj_dim)
        self.text_embedder = TextProjection(text_embed_dim, dim)
        self.image_embedder = (
            WanImageEmbedding(image_embed_dim, dim, pos_embed_seq_len) if image_embed_dim is not None else None
        )

    def time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D timesteps -> ``temb`` ``(N, D)`` and modulation ``(N, 6, D)`` (both in ``dtype``)."""
        sinus = timestep_embedding(timestep, self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_embedder(sinus.to(self.time_embedder.linear_1.bias.dtype)).to(dtype)
        proj = self.time_proj(F.silu(temb))
        return temb, proj.unflatten(1, (6, -1))


class WanAttention(nn.Module):
    """Multi-head attention with RMSNorm over all heads on q/k (diffusers WanAttention).

    Self-attention (``forward``) rotates q/k by RoPE. Cross-attention takes the context's K/V from
    ``context_kv`` (computed once per request); cross-attention layers of I2V models also attend from
    the same queries to the image tokens (``add_k_proj``/``add_v_proj``/``norm_added_k``) and add the
    two results.
    """

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim)
        self.to_k = Linear(dim, dim)
        self.to_v = Linear(dim, dim)
        self.to_out = nn.ModuleList([Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = Linear(added_kv_proj_dim, dim)
            self.add_v_proj = Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))

    def _kv(self, x: torch.Tensor, to_k: nn.Linear, to_v: nn.Linear, norm_k: nn.RMSNorm) -> KV:
        return self._heads(norm_k(to_k(x))), self._heads(to_v(x))

    def forward(self, x: torch.Tensor, rope: torch.Tensor | Rope, self_kv=None, shard=None) -> torch.Tensor:
        """Self-attention; with ``self_kv = (layer_cache, start_frame)`` (block-causal generation) this
        block's rotated K/V go into the cache and the queries attend to every frame it holds. ``shard``:
        sequence parallelism (Ulysses all-to-all around the attention call)."""
        q = apply_rope(self._heads(self.norm_q(self.to_q(x))), rope)
        k, v = self._kv(x, self.to_k, self.to_v, self.norm_k)
        k = apply_rope(k, rope)
        if self_kv is not None:
            k, v = self_kv[0].update(self_kv[1], k, v)
        return self.to_out[0](attention(q, k, v, shard=shard).flatten(2).to(x.dtype))

    def context_kv(self, context: torch.Tensor, context_img: Optional[torch.Tensor] = None) -> KV:
        """Cross-attention K/V of the text tokens (and of the image tokens when the layer has image projections)."""
        kv = self._kv(context, self.to_k, self.to_v, self.norm_k)
        if context_img is not None and self.add_k_proj is not None:
            kv += self._kv(context_img, self.add_k_proj, self.add_v_proj, self.norm_added_k)
        return kv

    def cross(self, x: torch.Tensor, kv: KV) -> torch.Tensor:
        q = self._heads(self.norm_q(self.to_q(x)))
        out = attention(q, kv[0], kv[1]).flatten(2).to(x.dtype)
        if len(kv) == 4:
            out = out + attention(q, kv[2], kv[3]).flatten(2).to(x.dtype)
        return self.to_out[0](out)


class Modulation:
    """The 6 (block) or 2 (output) modulation vectors: ``table + temb``, computed on distinct timesteps.

    ``mod`` is ``(N, K, D)`` float32; ``index`` is None (per-sample: N = B) or a ``(B, S)`` map from
    tokens to rows of ``mod`` (per-token timesteps), gathered only when a vector is used.
    """

    __slots__ = ("mod", "index")

    def __init__(self, table: torch.Tensor, temb: torch.Tensor, index: Optional[torch.Tensor]):
        self.mod, self.index = table.float() + temb.float(), index

    def __getitem__(self, i: int) -> torch.Tensor:
        m = self.mod[:, i]
        return m.unsqueeze(1) if self.index is None else m[self.index]

    def norm(self, x: torch.Tensor, eps: float, shift: int, scale: int) -> torch.Tensor:
        """``layer_norm(x) * (1 + scale) + shift`` in float32, in ``x``'s dtype; for one sample a single
        ``layer_norm`` with the scale/shift as its affine."""
        d = x.shape[-1]
        if self.index is None and self.mod.shape[0] == 1 and x.shape[0] == 1:
            return F.layer_norm(x.float(), (d,), 1 + self.mod[0, scale], self.mod[0, shift], eps).to(x.dtype)
        return torch.addcmul(self[shift], F.layer_norm(x.float(), (d,), eps=eps), 1 + self[scale]).to(x.dtype)

    def gate(self, x: torch.Tensor, y: torch.Tensor, gate: int) -> torch.Tensor:
        """Gated residual ``x + y * gate`` in float32 (the gate is float32), in ``x``'s dtype."""
        return torch.addcmul(x, y, self[gate]).to(x.dtype)


class WanTransformerBlock(nn.Module):
    """AdaLN-modulated self-attn (with RoPE), un-modulated cross-attn, AdaLN-modulated GELU FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool, eps: float,
                 added_kv_proj_dim: Optional[int]):
        super().__init__()
        self.eps = eps
        self.attn1 = WanAttention(dim, num_heads, eps)
        self.attn2 = WanAttention(dim, num_heads, eps, added_kv_proj_dim)
        self.norm2 = nn.LayerNorm(dim, eps) if cross_attn_norm else None
        self.ffn = FeedForward(dim, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation(self, temb_proj: torch.Tensor, token_index: Optional[torch.Tensor]) -> Modulation:
        return Modulation(self.scale_shift_table, temb_proj, token_index)

    def forward(self, x: torch.Tensor, kv: KV, temb_proj: torch.Tensor, token_index: Optional[torch.Tensor],
                rope: torch.Tensor | Rope, self_kv=None, shard=None) -> torch.Tensor:
        """``shard``: sequence parallelism for the self-attention; the cross-attention to the (replicated)
        context needs no communication and stays local."""
        mod = self.modulation(temb_proj, token_index)
        x = mod.gate(x, self.attn1(mod.norm(x, self.eps, 0, 1), rope, self_kv, shard), 2)
        h = x if self.norm2 is None else _fp32_layer_norm(x, self.norm2)
        x = x + self.attn2.cross(h, kv)
        return mod.gate(x, self.ffn(mod.norm(x, self.eps, 3, 4)), 5)
