"""Wan 2.1 / 2.2 video transformer (DiT with self-attn, text cross-attn and optional image cross-attn).

Parameter names equal diffusers' ``WanTransformer3DModel`` so Diffusers-format checkpoints load
unchanged; numerics follow it too (fp32 parity is tested against diffusers).

Per-step work is kept lean:

* RoPE tables depend only on the latent size: ``WanTransformer3DModel.rope(frames, height, width)``
  builds them once per request (float64 on the CPU, like diffusers' buffers, then float32 on the
  model's device) and the pipeline passes them to every ``forward`` as ``rotary_emb``. Tables are the
  compact ``(S, 1, head_dim / 2)`` cos/sin halves rather than diffusers' pair-duplicated ``(1, S, 1, D)``.
* Image context (Wan 2.1 I2V / FLF2V) travels separately from the text context, so blocks do not
  split a concatenated sequence at a hard-coded 512-token boundary as diffusers does.
* Per-token timesteps (Wan 2.2 TI2V-5B, ``expand_timesteps``) take only a handful of distinct values,
  so the timestep MLP and the modulation tables run on the distinct values and are gathered per
  token right where they are used, instead of materialising ``(B, S, 6, D)`` float32 tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.models.attention import attention
from diffcore.models.base import ModelMixin
from diffcore.models.embeddings import TimestepEmbedding, timestep_embedding

Rope = tuple[torch.Tensor, torch.Tensor]


def _fp32_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """diffusers' FP32LayerNorm: normalise in float32 (output stays float32; callers cast back)."""
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(B, S, H, D)`` by half tables ``(S, 1, D/2)``; math in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class _GELUProj(nn.Module):
    """``net.0`` of diffusers' FeedForward: a Linear followed by GELU (exact or tanh)."""

    def __init__(self, dim: int, inner: int, approximate: str):
        super().__init__()
        self.approximate = approximate
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """GELU MLP with diffusers' ``net.0.proj`` / ``net.2`` names (``net.1`` is a parameter-free dropout)."""

    def __init__(self, dim: int, inner: int, out: Optional[int] = None, approximate: str = "tanh"):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, inner, approximate), nn.Identity(), nn.Linear(inner, out or dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TextProjection(nn.Module):
    """Caption projection (diffusers PixArtAlphaTextProjection with GELU-tanh)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


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
        x = _fp32_layer_norm(x, self.norm1).to(x.dtype)
        x = self.ff(x)
        return _fp32_layer_norm(x, self.norm2).to(x.dtype)


class WanTimeTextImageEmbedding(nn.Module):
    """Timestep MLP (+ 6-way modulation projection), text projection and optional image projection."""

    def __init__(self, dim: int, time_freq_dim: int, time_proj_dim: int, text_embed_dim: int,
                 image_embed_dim: Optional[int] = None, pos_embed_seq_len: Optional[int] = None):
        super().__init__()
        self.freq_dim = time_freq_dim
        self.time_embedder = TimestepEmbedding(time_freq_dim, dim)
        self.time_proj = nn.Linear(dim, time_proj_dim)
        self.text_embedder = TextProjection(text_embed_dim, dim)
        self.image_embedder = (
            WanImageEmbedding(image_embed_dim, dim, pos_embed_seq_len) if image_embed_dim is not None else None
        )

    def time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D timesteps -> ``temb`` ``(N, D)`` and modulation ``(N, 6, D)`` (both in ``dtype``)."""
        sinus = timestep_embedding(timestep, self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_embedder(sinus.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        proj = self.time_proj(F.silu(temb))
        return temb, proj.unflatten(1, (6, -1))


class WanAttention(nn.Module):
    """Multi-head attention with RMSNorm over all heads on q/k (diffusers WanAttention).

    Cross-attention layers of I2V models also attend from the same queries to the image tokens
    (``add_k_proj``/``add_v_proj``/``norm_added_k``) and add the two results.
    """

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, rotary_emb: Optional[Rope] = None,
                context_img: Optional[torch.Tensor] = None) -> torch.Tensor:
        kv = x if context is None else context
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(kv)))
        v = self._heads(self.to_v(kv))
        if rotary_emb is not None:
            q, k = apply_rope(q, *rotary_emb), apply_rope(k, *rotary_emb)
        out = attention(q, k, v).flatten(2).to(q.dtype)
        if context_img is not None and self.add_k_proj is not None:
            k_img = self._heads(self.norm_added_k(self.add_k_proj(context_img)))
            v_img = self._heads(self.add_v_proj(context_img))
            out = out + attention(q, k_img, v_img).flatten(2).to(q.dtype)
        return self.to_out[0](out)


class _Modulation:
    """The 6 (block) or 2 (output) modulation vectors: ``table + temb``, computed on distinct timesteps.

    ``mod`` is ``(N, K, D)`` float32; ``index`` is None (per-sample: N = B) or a ``(B, S)`` map from
    tokens to rows of ``mod`` (per-token timesteps), gathered only when a vector is used.
    """

    __slots__ = ("mod", "index")

    def __init__(self, mod: torch.Tensor, index: Optional[torch.Tensor]):
        self.mod, self.index = mod, index

    def __getitem__(self, i: int) -> torch.Tensor:
        m = self.mod[:, i]
        return m.unsqueeze(1) if self.index is None else m[self.index]


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

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb_proj: torch.Tensor,
                token_index: Optional[torch.Tensor], rotary_emb: Rope,
                context_img: Optional[torch.Tensor] = None) -> torch.Tensor:
        mod = _Modulation(self.scale_shift_table.float() + temb_proj.float(), token_index)
        dtype = x.dtype

        h = (self._norm(x) * (1 + mod[1]) + mod[0]).to(dtype)
        x = (x.float() + self.attn1(h, rotary_emb=rotary_emb) * mod[2]).to(dtype)

        h = x if self.norm2 is None else _fp32_layer_norm(x, self.norm2).to(dtype)
        x = x + self.attn2(h, context, context_img=context_img)

        h = (self._norm(x) * (1 + mod[4]) + mod[3]).to(dtype)
        return (x.float() + self.ffn(h).float() * mod[5]).to(dtype)


class WanTransformer3DModel(ModelMixin):
    """Wan video DiT. ``forward`` takes latents ``(B, C, F, H, W)`` and returns the prediction, same shape
    with ``out_channels``. ``timestep`` is ``(B,)`` or per-token ``(B, S)`` (Wan 2.2 TI2V expand_timesteps).
    """

    diffusers_class_name = "WanTransformer3DModel"
    # diffusers keeps these in float32 when loading in half precision; so does diffcore's loader.
    _keep_in_fp32_modules = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    # present in some original checkpoints, unused by the model (diffusers ignores it on load).
    ignore_unexpected_keys = ("norm_added_q",)

    @classmethod
    def map_state_dict_key(cls, key: str) -> str | None:
        """Drop the checkpoint keys diffusers ignores (``None`` tells the loader to skip a key)."""
        parts = key.split(".")
        return None if any(p in cls.ignore_unexpected_keys for p in parts) else key

    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: Optional[str] = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: Optional[int] = None,
        added_kv_proj_dim: Optional[int] = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: Optional[int] = None,
    ):
        super().__init__()
        # diffusers accepts qk_norm but always applies RMSNorm across heads; so do we.
        inner = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.patch_size = tuple(patch_size)
        self.head_dim = attention_head_dim
        self.rope_max_seq_len = rope_max_seq_len
        self.out_channels = out_channels

        self.patch_embedding = nn.Conv3d(in_channels, inner, kernel_size=self.patch_size, stride=self.patch_size)
        self.condition_embedder = WanTimeTextImageEmbedding(inner, freq_dim, 6 * inner, text_dim, image_dim,
                                                            pos_embed_seq_len)
        self.blocks = nn.ModuleList(
            WanTransformerBlock(inner, ffn_dim, num_attention_heads, cross_attn_norm, eps, added_kv_proj_dim)
            for _ in range(num_layers)
        )
        self.eps = eps
        self.proj_out = nn.Linear(inner, out_channels * math.prod(self.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner) / inner**0.5)

    # ---- per-request constants -------------------------------------------------------------------

    def rope(self, num_frames: int, height: int, width: int, device: torch.device | str | None = None,
             theta: float = 10000.0) -> Rope:
        """RoPE cos/sin half tables ``(S, 1, head_dim/2)`` for a latent of ``num_frames x height x width``.

        The head dim is split into time / height / width parts (``h = w = 2 * (D // 6)``, time gets
        the rest), each with its own 1-D frequencies over that axis' patch index.
        """
        pt, ph, pw = self.patch_size
        sizes = (num_frames // pt, height // ph, width // pw)
        if max(sizes) > self.rope_max_seq_len:
            raise ValueError(f"latent grid {sizes} exceeds rope_max_seq_len={self.rope_max_seq_len}")
        d_hw = 2 * (self.head_dim // 6)
        dims = (self.head_dim - 2 * d_hw, d_hw, d_hw)
        angles = []
        for axis, (n, d) in enumerate(zip(sizes, dims)):
            freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            a = torch.outer(torch.arange(n, dtype=torch.float64), freqs)
            shape = [1, 1, 1, d // 2]
            shape[axis] = n
            angles.append(a.view(shape).expand(*sizes, d // 2))
        angles = torch.cat(angles, dim=-1).reshape(-1, 1, self.head_dim // 2)
        device = self.device if device is None else device
        return angles.cos().float().to(device), angles.sin().float().to(device)

    # ---- denoising step --------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
        rotary_emb: Optional[Rope] = None,
    ) -> torch.Tensor:
        b, _, f, h, w = hidden_states.shape
        pt, ph, pw = self.patch_size
        if rotary_emb is None:
            rotary_emb = self.rope(f, h, w, device=hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        dtype = encoder_hidden_states.dtype
        emb = self.condition_embedder

        # Per-token timesteps have few distinct values: embed those, keep a token -> row index.
        if timestep.ndim == 2:
            timestep, token_index = torch.unique(timestep, return_inverse=True)
        else:
            timestep, token_index = timestep.reshape(-1), None  # (B,) or a scalar shared by the batch
        temb, temb_proj = emb.time(timestep, dtype)

        context = emb.text_embedder(encoder_hidden_states)
        context_img = None
        if encoder_hidden_states_image is not None and emb.image_embedder is not None:
            context_img = emb.image_embedder(encoder_hidden_states_image)

        for block in self.blocks:
            x = block(x, context, temb_proj, token_index, rotary_emb, context_img)

        mod = _Modulation(self.scale_shift_table.float() + temb.float().unsqueeze(1), token_index)
        x = (F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + mod[1]) + mod[0]).to(x.dtype)
        x = self.proj_out(x)

        # unpatchify: (B, F'H'W', pt*ph*pw*C) -> (B, C, F, H, W)
        x = x.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f // pt * pt, h // ph * ph, w // pw * pw)
