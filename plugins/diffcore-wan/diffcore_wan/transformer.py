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
* The text (and image) context is the same at every step: with a ``ContextCache`` (the pipeline
  passes one per request and CFG branch) the text embedder and every block's cross-attention K/V
  run once per request instead of once per step.
* AdaLN modulation is one ``layer_norm`` with the per-sample ``1 + scale`` / ``shift`` as its affine
  (batch 1; ``addcmul`` otherwise), gated residuals are one ``addcmul`` and RoPE is one complex
  multiply; all in float32 like diffusers, rounded once to the activation dtype.
* Token-wise projections use ``diffcore.models.linear`` (oneDNN GEMMs on the CPU, the FFN's
  GELU(tanh) fused into its first GEMM).

Sequence parallelism (Ulysses, ``diffcore.parallel``): each rank runs a shard of the video tokens
(RoPE rows and per-token timestep indices sharded alike); self-attention all-to-alls to head shards
of the full sequence and back, cross-attention stays local; ``cache_tail`` gathers the output.

The model implements diffcore's block-cache protocol (``cache_embed`` / ``cache_blocks`` /
``cache_tail``, see ``diffcore.cache``) and ``forward`` is exactly their composition, so step caches
(FBCache, TeaCache) run the same code.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.cache.base import CacheState
from diffcore.models.attention import attention
from diffcore.models.base import ModelMixin
from diffcore.models.embeddings import TimestepEmbedding, timestep_embedding
from diffcore.models.linear import Linear, linear
from diffcore.parallel import sequence_shard

from .key_layouts import LAYOUTS

Rope = tuple[torch.Tensor, torch.Tensor]
KV = tuple[torch.Tensor, ...]  # one block's cross-attention (k, v) or (k, v, k_img, v_img), each (B, S, H, D)


def _fp32_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """diffusers' FP32LayerNorm: statistics and affine in float32, rounded once to ``x``'s dtype."""
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).to(x.dtype)


def rope_table(rope: Rope) -> torch.Tensor | Rope:
    """Half tables ``(S, 1, D/2)`` -> the complex rotations ``cos + i sin``, built once per call.

    Under torch.compile (inductor has no complex kernels) the ``(cos, sin)`` pair is kept.
    """
    return rope if torch.compiler.is_compiling() else torch.complex(*rope)


def apply_rope(x: torch.Tensor, table: torch.Tensor | Rope) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(B, S, H, D)`` by ``rope_table(...)``; math in float32, as diffusers."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if isinstance(table, tuple):
        (x1, x2), (cos, sin) = pairs.unbind(-1), table
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * table)
    return out.flatten(-2).to(x.dtype)


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


class ContextCache:
    """What a model derives from one request's text/image context: every block's cross-attention K/V.

    The context is the same at every denoising step, so the pipeline passes one cache per request
    and CFG branch and the projections run on the first step only. Entries are keyed by model, so
    the two experts of Wan 2.2 A14B keep their own. Costs ``2 * num_layers`` context-sized tensors per
    branch (bench checkpoint: 8 MB fp32 for ~3% of a step; Wan 14B bf16: ~0.4 GB, a far smaller share
    of its long-sequence steps).
    """

    def __init__(self):
        self._kv: dict[nn.Module, list[KV]] = {}

    def get(self, model: nn.Module, build) -> list[KV]:
        if model not in self._kv:
            self._kv[model] = build()
        return self._kv[model]


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


class _Modulation:
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

    def modulation(self, temb_proj: torch.Tensor, token_index: Optional[torch.Tensor]) -> _Modulation:
        return _Modulation(self.scale_shift_table, temb_proj, token_index)

    def forward(self, x: torch.Tensor, kv: KV, temb_proj: torch.Tensor, token_index: Optional[torch.Tensor],
                rope: torch.Tensor | Rope, self_kv=None, shard=None) -> torch.Tensor:
        """``shard``: sequence parallelism for the self-attention; the cross-attention to the (replicated)
        context needs no communication and stays local."""
        mod = self.modulation(temb_proj, token_index)
        x = mod.gate(x, self.attn1(mod.norm(x, self.eps, 0, 1), rope, self_kv, shard), 2)
        h = x if self.norm2 is None else _fp32_layer_norm(x, self.norm2)
        x = x + self.attn2.cross(h, kv)
        return mod.gate(x, self.ffn(mod.norm(x, self.eps, 3, 4)), 5)


class WanTransformer3DModel(ModelMixin):
    """Wan video DiT. ``forward`` takes latents ``(B, C, F, H, W)`` and returns the prediction, same shape
    with ``out_channels``. ``timestep`` is ``(B,)`` or per-token ``(B, S)`` (Wan 2.2 TI2V expand_timesteps).
    """

    diffusers_class_name = "WanTransformer3DModel"
    checkpoint_layouts = LAYOUTS  # Diffusers names, and the original single-file layout (key_layouts.py)
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
        self.proj_out = Linear(inner, out_channels * math.prod(self.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner) / inner**0.5)

    # ---- per-request constants -------------------------------------------------------------------

    def rope(self, num_frames: int, height: int, width: int, device: torch.device | str | None = None,
             theta: float = 10000.0, start_frame: int = 0) -> Rope:
        """RoPE cos/sin half tables ``(S, 1, head_dim/2)`` for a latent of ``num_frames x height x width``
        whose first frame is frame ``start_frame`` of the video (block-causal generation).

        The head dim is split into time / height / width parts (``h = w = 2 * (D // 6)``, time gets
        the rest), each with its own 1-D frequencies over that axis' patch index.
        """
        pt, ph, pw = self.patch_size
        sizes = (num_frames // pt, height // ph, width // pw)
        if max(sizes[0] + start_frame // pt, *sizes[1:]) > self.rope_max_seq_len:
            raise ValueError(f"latent grid {sizes} (from frame {start_frame}) exceeds rope_max_seq_len={self.rope_max_seq_len}")
        d_hw = 2 * (self.head_dim // 6)
        dims = (self.head_dim - 2 * d_hw, d_hw, d_hw)
        angles = []
        for axis, (n, d) in enumerate(zip(sizes, dims)):
            freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            first = start_frame // pt if axis == 0 else 0
            a = torch.outer(torch.arange(first, first + n, dtype=torch.float64), freqs)
            shape = [1, 1, 1, d // 2]
            shape[axis] = n
            angles.append(a.view(shape).expand(*sizes, d // 2))
        angles = torch.cat(angles, dim=-1).reshape(-1, 1, self.head_dim // 2)
        device = self.device if device is None else device
        return angles.cos().float().to(device), angles.sin().float().to(device)

    # ---- denoising step --------------------------------------------------------------------------

    def context_kv(self, encoder_hidden_states: torch.Tensor,
                   encoder_hidden_states_image: Optional[torch.Tensor] = None) -> list[KV]:
        """Every block's cross-attention K/V of the (embedded) text and image context."""
        emb = self.condition_embedder
        context = emb.text_embedder(encoder_hidden_states)
        context_img = None
        if encoder_hidden_states_image is not None and emb.image_embedder is not None:
            context_img = emb.image_embedder(encoder_hidden_states_image)
        return [block.attn2.context_kv(context, context_img) for block in self.blocks]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
        rotary_emb: Optional[Rope] = None,
        context_cache: Optional[ContextCache] = None,
        kv_cache=None,
        start_frame: int = 0,
    ) -> torch.Tensor:
        """One denoiser evaluation. Pass ``rotary_emb=self.rope(F, H, W)`` and a ``ContextCache`` (one per
        request and CFG branch) to compute RoPE and the context's K/V once per request.

        Block-causal generation: ``hidden_states`` is one block of latent frames starting at video frame
        ``start_frame`` and ``kv_cache`` a ``diffcore.models.kv_cache.CausalKVCache`` (one per request)
        holding the earlier blocks' self-attention K/V; ``rotary_emb``, if given, covers the whole video.
        """
        state = self.cache_embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                 rotary_emb, context_cache, kv_cache, start_frame)
        return self.cache_tail(self.cache_blocks(state, 0, self.cache_num_blocks))

    def _block_rope(self, rotary_emb: Optional[Rope], size, start_frame: int, causal: bool, device) -> Rope:
        f, h, w = size
        if rotary_emb is None:
            return self.rope(f, h, w, device=device, start_frame=start_frame)
        if not causal:
            return rotary_emb
        pt, ph, pw = self.patch_size
        per_frame = (h // ph) * (w // pw)
        first, n = start_frame // pt * per_frame, f // pt * per_frame
        if first + n > rotary_emb[0].shape[0]:
            raise ValueError(f"frames {start_frame}..{start_frame + f} lie outside the video's RoPE table")
        return rotary_emb[0][first:first + n], rotary_emb[1][first:first + n]

    # -- block-cache protocol (diffcore.cache): forward == tail(blocks(embed)) ------------------------
    def cache_embed(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                    rotary_emb=None, context_cache=None, kv_cache=None, start_frame: int = 0) -> CacheState:
        """Patch embedding, timestep modulation and context K/V; ``state.hidden`` is the video tokens."""
        _, _, f, h, w = hidden_states.shape
        rotary_emb = self._block_rope(rotary_emb, (f, h, w), start_frame, kv_cache is not None, hidden_states.device)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        # Per-token timesteps have few distinct values: embed those, keep a token -> row index.
        if timestep.ndim == 2:
            timestep, token_index = torch.unique(timestep, return_inverse=True)
        else:
            timestep, token_index = timestep.reshape(-1), None  # (B,) or a scalar shared by the batch
        temb, temb_proj = self.condition_embedder.time(timestep, encoder_hidden_states.dtype)

        def build():
            return self.context_kv(encoder_hidden_states, encoder_hidden_states_image)

        kv = build() if context_cache is None else context_cache.get(self, build)
        # Sequence parallelism: this rank runs a shard of the video tokens with their RoPE rows and
        # per-token timestep indices; cache_tail gathers the prediction before unpatchifying. Block-causal
        # generation (a self-attention KV cache) is not sharded: every rank then runs the whole sequence.
        shard = sequence_shard(x.shape[1]) if kv_cache is None else None
        if shard is not None:
            x = shard.split(x)
            rotary_emb = tuple(shard.split(t, dim=0) for t in rotary_emb)
            token_index = None if token_index is None else shard.split(token_index)
        extra = {"temb": temb, "temb_proj": temb_proj, "token_index": token_index, "kv": kv,
                 "rope": rope_table(rotary_emb), "size": hidden_states.shape[2:],
                 "self_kv": None if kv_cache is None else [(layer, start_frame) for layer in kv_cache.layers]}
        return CacheState(hidden=x, extra=extra, shard=shard)

    @property
    def cache_num_blocks(self) -> int:
        return len(self.blocks)

    def cache_blocks(self, state: CacheState, start: int, stop: int) -> CacheState:
        e, x = state.extra, state.hidden
        self_kv = e.get("self_kv") or [None] * len(self.blocks)
        for block, kv, cache in zip(self.blocks[start:stop], e["kv"][start:stop], self_kv[start:stop]):
            x = block(x, kv, e["temb_proj"], e["token_index"], e["rope"], cache, state.shard)
        state.hidden = x
        return state

    def cache_probe(self, state: CacheState) -> torch.Tensor:
        """TeaCache's signal: the first block's timestep-modulated input."""
        block, e = self.blocks[0], state.extra
        return block.modulation(e["temb_proj"], e["token_index"]).norm(state.hidden, block.eps, 0, 1)

    def cache_tail(self, state: CacheState) -> torch.Tensor:
        """Final modulated norm, projection and unpatchify to ``(B, out_channels, F, H, W)``."""
        e, x = state.extra, state.hidden
        mod = _Modulation(self.scale_shift_table, e["temb"].unsqueeze(1), e["token_index"])
        x = self.proj_out(mod.norm(x, self.eps, 0, 1))
        if state.shard is not None:
            x = state.shard.gather(x)

        # unpatchify: (B, F'H'W', pt*ph*pw*C) -> (B, C, F, H, W)
        (f, h, w), (pt, ph, pw), b = e["size"], self.patch_size, x.shape[0]
        x = x.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f // pt * pt, h // ph * ph, w // pw * pw)

    # -- block-causal generation (self-forcing) ---------------------------------------------------
    def new_kv_cache(self, latent_shape, window: int = -1, sink: int = 0):
        """A per-request self-attention KV cache for latents ``(B, C, F, H, W)`` (see CausalKVCache)."""
        from diffcore.models.kv_cache import CausalKVCache

        _, _, f, h, w = latent_shape
        pt, ph, pw = self.patch_size
        return CausalKVCache(len(self.blocks), (h // ph) * (w // pw), f // pt, window=window, sink=sink)


class CausalWanTransformer3DModel(WanTransformer3DModel):
    """The name some self-forcing checkpoints give the causal Wan DiT: the same parameters and the same
    module (every WanTransformer3DModel takes a ``kv_cache``); extra config keys such as
    ``num_frames_per_block`` / ``local_attn_size`` / ``sink_size`` stay readable in ``config``."""

    diffusers_class_name = "CausalWanTransformer3DModel"
