"""FLUX.1 transformer (MMDiT): double-stream blocks, then single-stream blocks over the joint sequence.

Parameter names equal diffusers' ``FluxTransformer2DModel`` so Diffusers-format checkpoints load
unchanged; numerics follow it too (fp32 parity is tested against diffusers).

Per-step work is kept lean:

* RoPE tables depend only on the position ids, i.e. on the request: ``FluxTransformer2DModel.rope``
  computes them once (in float64, like diffusers, then cast to float32) and the pipeline passes them
  to every ``forward`` call as ``rotary_emb``.
* ``silu(temb)`` is shared by all AdaLN modulations instead of being recomputed per block.
* Single-stream blocks run on one joint ``[text, image]`` sequence that is concatenated once and
  split once, instead of a concat/split in every block.
* AdaLN modulation and gated residuals are single fused ops (``layer_norm`` with the per-sample
  scale/shift as its affine for batch 1, ``addcmul`` otherwise), RoPE is one complex multiply.
* Token-wise projections use ``diffcore.models.linear`` (oneDNN GEMMs on the CPU, GELU fused into
  the MLP's first GEMM).
* Only the image rows of the last single-stream block's output are used (``cache_tail``), so that
  block computes queries, MLP, output projection and residual for the image rows only; text tokens
  still serve as keys/values. Same math, ~7% less work per step at 256 text + 256 image tokens.

Sequence parallelism (Ulysses, ``diffcore.parallel``): under a sequence-parallel pipeline each rank
runs a shard of the image tokens (with their RoPE rows) and the whole text stream; joint attention
all-to-alls to head shards of the full sequence and back; the output is gathered in ``cache_tail``.

The model implements diffcore's block-cache protocol (``cache_embed`` / ``cache_blocks`` /
``cache_tail``, see ``diffcore.cache``) and ``forward`` is exactly their composition, so step caches
(FBCache, TeaCache) reuse the same code path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.cache.base import CacheState
from diffcore.models.attention import attention
from diffcore.models.base import ModelMixin
from diffcore.models.embeddings import TimestepEmbedding, rope_frequencies, timestep_embedding
from diffcore.models.dit import FeedForward, modulate, rotary_table, rotate
from diffcore.models.linear import Linear, linear
from diffcore.parallel import sequence_shard

from .key_layouts import LAYOUTS

Rope = tuple[torch.Tensor, torch.Tensor]

_QK_EPS = 1e-6


class AdaLNModulation(nn.Module):
    """``linear(silu(temb))`` split into ``n`` per-sample ``(B, 1, D)`` vectors (shift/scale/gate...).

    Stands in for diffusers' AdaLayerNormZero / AdaLayerNormZeroSingle (only ``linear`` holds weights);
    it takes the already-activated ``silu(temb)`` so the activation is computed once per step.
    """

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = Linear(dim, n * dim)

    def forward(self, temb_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(temb_act).unsqueeze(1).chunk(self.n, dim=-1)


class AdaLNContinuous(nn.Module):
    """Final norm (diffusers AdaLayerNormContinuous): note the chunk order is scale, then shift."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(temb_act.to(x.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return modulate(x, shift, scale)


class FluxAttention(nn.Module):
    """QK-RMSNorm attention with RoPE; ``joint=True`` adds the text-stream projections of the double block.

    Joint attention attends over ``[text, image]`` (text first, matching the RoPE table order).
    Single-stream attention has no output projection (the block's ``proj_out`` fuses it with the MLP).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=_QK_EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=_QK_EPS)
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        if joint:
            self.to_out = nn.ModuleList([Linear(inner, dim), nn.Identity()])
            self.norm_added_q = nn.RMSNorm(head_dim, eps=_QK_EPS)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=_QK_EPS)
            self.add_q_proj = Linear(dim, inner)
            self.add_k_proj = Linear(dim, inner)
            self.add_v_proj = Linear(dim, inner)
            self.to_add_out = Linear(inner, dim)

    def _qkv(self, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k, queries_from: int = 0):
        split = (self.heads, self.head_dim)
        q = norm_q(to_q(x[:, queries_from:]).unflatten(-1, split))
        k = norm_k(to_k(x).unflatten(-1, split))
        return q, k, to_v(x).unflatten(-1, split)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, context: torch.Tensor | None = None, queries_from: int = 0,
                shard=None):
        """``queries_from=n`` (single-stream only): rows ``n:`` of ``x`` are the queries and the only output rows.
        ``shard``: sequence parallelism (the text rows are whole on every rank, the image rows one shard)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, queries_from)
        if context is not None:
            cq, ck, cv = self._qkv(
                context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
            )
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        q, k = rotate(q, rope[:, queries_from:]), rotate(k, rope)
        out = attention(q, k, v, shard=shard).flatten(2, 3).to(q.dtype)
        if context is None:
            return out
        n_txt = context.shape[1]
        return self.to_out[0](out[:, n_txt:].contiguous()), self.to_add_out(out[:, :n_txt].contiguous())


class FluxTransformerBlock(nn.Module):
    """Double-stream block: separate weights for image and text tokens, one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLNModulation(dim, 6)
        self.norm1_context = AdaLNModulation(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, temb_act: torch.Tensor, rope: torch.Tensor, shard=None):
        shift, scale, gate, shift2, scale2, gate2 = self.norm1(temb_act)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb_act)
        attn_x, attn_c = self.attn(modulate(x, shift, scale), rope, modulate(ctx, c_shift, c_scale), shard=shard)

        x = torch.addcmul(x, gate, attn_x)
        x = torch.addcmul(x, gate2, self.ff(modulate(x, shift2, scale2)))

        ctx = torch.addcmul(ctx, c_gate, attn_c)
        ctx = torch.addcmul(ctx, c_gate2, self.ff_context(modulate(ctx, c_shift2, c_scale2)))
        if ctx.dtype == torch.float16:
            ctx = ctx.clip(-65504, 65504)
        return x, ctx


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint sequence: parallel attention and MLP, fused output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLNModulation(dim, 3)
        self.proj_mlp = Linear(dim, self.mlp_hidden_dim)
        self.proj_out = Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False)

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor, rope: torch.Tensor, keep_from: int = 0,
                shard=None) -> torch.Tensor:
        """Returns rows ``keep_from:`` of the block's output; the other rows only serve as keys/values."""
        shift, scale, gate = self.norm(temb_act)
        normed = modulate(h, shift, scale)
        mlp = linear(normed[:, keep_from:], self.proj_mlp, "gelu_tanh")
        attn = self.attn(normed, rope, queries_from=keep_from, shard=shard)
        h = torch.addcmul(h[:, keep_from:], gate, self.proj_out(torch.cat([attn, mlp], dim=2)))
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h


class TimeTextEmbedding(nn.Module):
    """``temb = MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled text)``.

    Covers diffusers' CombinedTimestep(Guidance)TextProjEmbeddings; ``text_embedder`` has the same
    linear_1/silu/linear_2 layout as a TimestepEmbedding, so that class is reused for it.
    """

    def __init__(self, dim: int, pooled_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        if guidance_embeds:
            self.guidance_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    @staticmethod
    def _sinusoid(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0).to(dtype)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(self._sinusoid(timestep, pooled.dtype))
        if guidance is not None:
            emb = emb + self.guidance_embedder(self._sinusoid(guidance, pooled.dtype))
        return emb + self.text_embedder(pooled)


class FluxTransformer2DModel(ModelMixin):
    """FLUX.1 [dev|schnell] denoiser over packed latents ``(B, S_img, in_channels)``.

    ``timestep`` (and ``guidance``) use diffusers' convention: the pipeline passes ``t / 1000`` and
    the model multiplies by 1000. Returns the prediction ``(B, S_img, patch_size**2 * out_channels)``.
    """

    diffusers_class_name = "FluxTransformer2DModel"
    checkpoint_layouts = LAYOUTS  # Diffusers names, and the original single-file layout (key_layouts.py)

    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"sum(axes_dims_rope)={sum(axes_dims_rope)} must equal attention_head_dim={attention_head_dim}")
        self.out_channels = out_channels or in_channels
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.guidance_embeds = guidance_embeds
        self.axes_dims_rope = tuple(axes_dims_rope)
        self.rope_theta = 10000.0

        self.time_text_embed = TimeTextEmbedding(dim, pooled_projection_dim, guidance_embeds)
        self.context_embedder = Linear(joint_attention_dim, dim)
        self.x_embedder = Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers)]
        )
        self.norm_out = AdaLNContinuous(dim)
        self.proj_out = Linear(dim, patch_size * patch_size * self.out_channels)

    @torch.no_grad()
    def rope(self, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> Rope:
        """RoPE ``(cos, sin)`` tables, each ``(S_txt + S_img, head_dim)`` float32; compute once per request.

        ids are ``(S, n_axes)`` (a leading batch dim is dropped, as diffusers does). Frequencies are
        computed in float64 like diffusers; on backends without float64 (MPS) that happens on the CPU.
        """
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        ids = torch.cat([txt_ids, img_ids], dim=0).float()
        device = ids.device
        if device.type in ("mps", "npu"):
            ids = ids.cpu()
        tables = [rope_frequencies(d, ids[:, i], self.rope_theta) for i, d in enumerate(self.axes_dims_rope)]
        cos = torch.cat([c for c, _ in tables], dim=-1).to(device)
        sin = torch.cat([s for _, s in tables], dim=-1).to(device)
        return cos, sin

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        rotary_emb: Rope | None = None,
    ) -> torch.Tensor:
        """One denoiser evaluation; pass ``rotary_emb=self.rope(img_ids, txt_ids)`` to skip recomputing RoPE.

        ``guidance`` is required by guidance-distilled models (FLUX.1-dev) and ignored otherwise.
        """
        state = self.cache_embed(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                                 guidance, rotary_emb)
        return self.cache_tail(self.cache_blocks(state, 0, self.cache_num_blocks))

    # -- block-cache protocol (diffcore.cache): forward == tail(blocks(embed)) ------------------------
    def cache_embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids=None,
                    txt_ids=None, guidance=None, rotary_emb=None) -> CacheState:
        """Embeddings and conditioning; ``state.hidden`` is the image stream ``x``."""
        if rotary_emb is None:
            if img_ids is None or txt_ids is None:
                raise ValueError("pass either rotary_emb or both img_ids and txt_ids")
            rotary_emb = self.rope(img_ids, txt_ids)
        # Sequence parallelism: this rank embeds and runs its shard of the image tokens (and RoPE rows);
        # the text tokens stay whole on every rank; cache_tail gathers the prediction.
        shard = sequence_shard(hidden_states.shape[1])
        rope = rotary_table(rotary_emb)
        if shard is not None:
            n_txt = encoder_hidden_states.shape[1]
            hidden_states = shard.split(hidden_states)
            rope = torch.cat([rope[:, :n_txt], shard.split(rope[:, n_txt:])], dim=1)
        x = self.x_embedder(hidden_states)
        batch = x.shape[0]

        timestep = timestep.to(x.dtype).reshape(-1).expand(batch) * 1000
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled: pass `guidance`")
            guidance = guidance.to(x.dtype).reshape(-1).expand(batch) * 1000
        else:
            guidance = None
        temb = self.time_text_embed(timestep, guidance, pooled_projections)
        extra = {"temb_act": F.silu(temb), "ctx": self.context_embedder(encoder_hidden_states), "rope": rope}
        return CacheState(hidden=x, extra=extra, shard=shard)

    @property
    def cache_num_blocks(self) -> int:
        return len(self.transformer_blocks) + len(self.single_transformer_blocks)

    def cache_blocks(self, state: CacheState, start: int, stop: int) -> CacheState:
        """Blocks ``[start, stop)``: double-stream blocks first, then single-stream ones on ``[ctx, x]``.

        Running the last block ends the text stream: ``cache_tail`` uses only ``x``, so that block skips
        the text rows' outputs and ``state.extra["ctx"]`` becomes ``None``.
        """
        x, ctx, temb_act, rope = state.hidden, state.extra["ctx"], state.extra["temb_act"], state.extra["rope"]
        n_double = len(self.transformer_blocks)
        for block in self.transformer_blocks[start:stop]:
            x, ctx = block(x, ctx, temb_act, rope, shard=state.shard)
        singles = self.single_transformer_blocks[max(start - n_double, 0):max(stop - n_double, 0)]
        if len(singles):
            n_txt = ctx.shape[1]
            last = stop >= self.cache_num_blocks
            h = torch.cat([ctx, x], dim=1)
            for i, block in enumerate(singles):
                h = block(h, temb_act, rope, keep_from=n_txt if last and i == len(singles) - 1 else 0, shard=state.shard)
            ctx, x = (None, h) if last else (h[:, :n_txt], h[:, n_txt:])
        state.hidden, state.extra["ctx"] = x, ctx
        return state

    def cache_probe(self, state: CacheState) -> torch.Tensor:
        """TeaCache's signal: the first block's timestep-modulated image input."""
        shift, scale = self.transformer_blocks[0].norm1(state.extra["temb_act"])[:2]
        return modulate(state.hidden, shift, scale)

    def cache_tail(self, state: CacheState) -> torch.Tensor:
        out = self.proj_out(self.norm_out(state.hidden, state.extra["temb_act"]))
        return out if state.shard is None else state.shard.gather(out)
