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

The layers (embedders, attention, modulation, block) are in ``layers.py``, the RoPE tables and rotation in
``rope.py``, the original single-file key layout in ``key_layouts.py``.

The model implements diffcore's block-cache protocol (``cache_embed`` / ``cache_blocks`` /
``cache_tail``, see ``diffcore.cache``) and ``forward`` is exactly their composition, so step caches
(FBCache, TeaCache) run the same code.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from diffcore.cache.base import CacheState
from diffcore.models.base import ModelMixin
from diffcore.models.linear import Linear
from diffcore.parallel import sequence_shard

from .key_layouts import LAYOUTS
from .layers import KV, Modulation, WanTimeTextImageEmbedding, WanTransformerBlock
from .rope import Rope, rope_table, rope_tables


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
        """RoPE tables for a latent of ``num_frames x height x width`` from video frame ``start_frame``
        (``rope.rope_tables``), on ``device`` (default: the model's)."""
        return rope_tables(self.patch_size, self.head_dim, self.rope_max_seq_len, num_frames, height, width,
                           self.device if device is None else device, theta, start_frame)

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
        mod = Modulation(self.scale_shift_table, e["temb"].unsqueeze(1), e["token_index"])
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
