"""FLUX.2 transformer (``Flux2Transformer2DModel``): double-stream blocks, then fused single-stream blocks.

Parameter names equal diffusers' class so Diffusers-format FLUX.2 [dev] / [klein] checkpoints load
unchanged (the BFL single-file layout is converted by ``flux2_key_layouts``); numerics follow it
(fp32 parity against diffusers is tested).

What differs from FLUX.1 and why it is laid out this way:

* All linear layers are bias-free; the feed-forward is SwiGLU with gate and up projection fused.
* Modulation is shared by the whole network: one ``linear(silu(temb))`` per stream and step
  (``double_stream_modulation_img/_txt``, ``single_stream_modulation``), computed once in
  ``cache_embed`` and handed to every block.
* A single-stream block is one fused projection ``to_qkv_mlp_proj`` (Q, K, V, gate, up) and one fused
  output ``to_out`` over ``[attention, mlp]``.
* RoPE has four axes (t, h, w, l), theta 2000; reference images sit at t = 10, 20, ... The table is
  computed once per request (``rope``) and passed as ``rotary_emb``.
* Reference K/V cache (klein-9b-kv): with ``ref_kv`` (a :class:`RefKV`), the first call embeds the
  reference tokens at timestep ``ref_timestep`` (0), lets them attend only among themselves, and stores
  their per-layer K/V after RoPE; later calls insert the stored K/V between text and image keys and
  never run the reference tokens again. The reference stream is kept beside ``state.hidden`` so the
  step caches see the same image-token shape on every step.

Sequence parallelism (Ulysses): image tokens (target and references) are sharded, text stays whole.
The model implements the block-cache protocol (``diffcore.cache``); ``forward`` is its composition.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.cache.base import CacheState
from diffcore.models.attention import attention
from diffcore.models.base import ModelMixin
from diffcore.models.dit import modulate, rotary_table, rotate
from diffcore.models.embeddings import TimestepEmbedding, rope_frequencies, timestep_embedding
from diffcore.models.linear import Linear
from diffcore.parallel import sequence_shard

from .flux2_key_layouts import LAYOUTS

Rope = tuple[torch.Tensor, torch.Tensor]


class RefKV:
    """Per-request reference K/V store of the KV mode: filled by the first transformer call, read after.

    ``tokens``: packed reference latents ``(B, n_ref, C)``; ``rope``: the RoPE table of the extract call
    over ``[text, references, image]``. One instance belongs to one request (its condition dict)."""

    def __init__(self, tokens: torch.Tensor, rope: Rope, ref_timestep: float = 0.0):
        self.tokens, self.rope, self.ref_timestep = tokens, rope, ref_timestep
        self.n_ref = tokens.shape[1]
        self.double: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.single: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.filled = False


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class Flux2FeedForward(nn.Module):
    """SwiGLU MLP; ``linear_in`` holds gate and up projections (gate first)."""

    def __init__(self, dim: int, mult: float):
        super().__init__()
        inner = int(dim * mult)
        self.linear_in = Linear(dim, 2 * inner, bias=False)
        self.linear_out = Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(swiglu(self.linear_in(x)))


class Flux2Modulation(nn.Module):
    """``linear(silu(temb))`` split into ``3 * sets`` vectors (shift, scale, gate per set)."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, temb_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(temb_act).unsqueeze(1).chunk(3 * self.sets, dim=-1)


def _per_token(mods, ref_mods, n_before: int, n_ref: int, n_after: int):
    """Modulation vectors per token for ``[n_before rows, n_ref reference rows, n_after rows]``."""
    out = []
    for m, r in zip(mods, ref_mods):
        b = m.shape[0]
        parts = [m.expand(b, n_before, -1)] if n_before else []
        out.append(torch.cat(parts + [r.expand(b, n_ref, -1), m.expand(b, n_after, -1)], dim=1))
    return tuple(out)


def _kv_attention(q, k, v, n_txt: int, mode: Optional[str], store: dict, index: int, n_ref: int, shard):
    """Attention over ``[text, (references), image]`` rows, with the KV mode's reference handling."""
    if mode is None:
        return attention(q, k, v, shard=shard)
    if mode == "cached":
        k_ref, v_ref = store[index]
        k = torch.cat([k[:, :n_txt], k_ref, k[:, n_txt:]], dim=1)
        v = torch.cat([v[:, :n_txt], v_ref, v[:, n_txt:]], dim=1)
        return attention(q, k, v)
    # extract: keep the references' K/V; they attend among themselves, text and image rows to all
    end = n_txt + n_ref
    store[index] = (k[:, n_txt:end].clone(), v[:, n_txt:end].clone())
    others = attention(torch.cat([q[:, :n_txt], q[:, end:]], dim=1), k, v)
    refs = attention(q[:, n_txt:end], k[:, n_txt:end], v[:, n_txt:end])
    return torch.cat([others[:, :n_txt], refs, others[:, n_txt:]], dim=1)


class Flux2Attention(nn.Module):
    """Double-stream joint attention: image and text projections, QK RMSNorm, one attention over [text, image]."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (Linear(dim, inner, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([Linear(inner, dim, bias=False), nn.Identity()])
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, inner, bias=False) for _ in range(3))
        self.to_add_out = Linear(inner, dim, bias=False)

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        split = (-1, self.head_dim)
        return norm_q(to_q(x).unflatten(-1, split)), norm_k(to_k(x).unflatten(-1, split)), to_v(x).unflatten(-1, split)

    def forward(self, x, ctx, table, kv=None, index: int = 0, shard=None):
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        cq, ck, cv = self._qkv(ctx, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                               self.norm_added_k)
        q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        q, k = rotate(q, table), rotate(k, table)
        n_txt = ctx.shape[1]
        mode, store, n_ref = kv if kv is not None else (None, None, 0)
        out = _kv_attention(q, k, v, n_txt, mode, store, index, n_ref, shard).flatten(2, 3).to(q.dtype)
        return self.to_out[0](out[:, n_txt:].contiguous()), self.to_add_out(out[:, :n_txt].contiguous())


class Flux2TransformerBlock(nn.Module):
    """Double-stream block; ``mods``: the shared image/text modulation vectors of this step."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Flux2Attention(dim, heads, head_dim, eps)
        self.ff = Flux2FeedForward(dim, mlp_ratio)
        self.ff_context = Flux2FeedForward(dim, mlp_ratio)

    def forward(self, x, ctx, mod_img, mod_txt, table, kv=None, index: int = 0, shard=None):
        shift, scale, gate, shift2, scale2, gate2 = mod_img
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = mod_txt
        eps = self.eps
        attn_x, attn_c = self.attn(modulate(x, shift, scale, eps), modulate(ctx, c_shift, c_scale, eps), table,
                                   kv, index, shard)
        x = torch.addcmul(x, gate, attn_x)
        x = torch.addcmul(x, gate2, self.ff(modulate(x, shift2, scale2, eps)))
        ctx = torch.addcmul(ctx, c_gate, attn_c)
        ctx = torch.addcmul(ctx, c_gate2, self.ff_context(modulate(ctx, c_shift2, c_scale2, eps)))
        if ctx.dtype == torch.float16:
            ctx = ctx.clip(-65504, 65504)
        return x, ctx


class Flux2ParallelSelfAttention(nn.Module):
    """Single-stream attention + MLP with fused input (``to_qkv_mlp_proj``) and output (``to_out``) projections."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.head_dim, self.inner = head_dim, heads * head_dim
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.to_qkv_mlp_proj = Linear(dim, 3 * self.inner + 2 * self.mlp_hidden_dim, bias=False)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = Linear(self.inner + self.mlp_hidden_dim, dim, bias=False)

    def forward(self, h, table, n_txt: int, keep_from: int = 0, kv=None, index: int = 0, shard=None):
        """Rows ``keep_from:`` of the output (the others only serve as keys/values)."""
        proj = self.to_qkv_mlp_proj(h)
        qkv, mlp = proj.split([3 * self.inner, proj.shape[-1] - 3 * self.inner], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in qkv.chunk(3, dim=-1))
        q, k = rotate(self.norm_q(q), table), rotate(self.norm_k(k), table)
        mode, store, n_ref = kv if kv is not None else (None, None, 0)
        if mode is None and keep_from:
            out = attention(q[:, keep_from:], k, v, shard=shard)  # the text rows' outputs are not needed
        else:
            out = _kv_attention(q, k, v, n_txt, mode, store, index, n_ref, shard)[:, keep_from:]
        out = out.flatten(2, 3).to(q.dtype)
        return self.to_out(torch.cat([out, swiglu(mlp[:, keep_from:])], dim=-1))


class Flux2SingleTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Flux2ParallelSelfAttention(dim, heads, head_dim, mlp_ratio, eps)

    def forward(self, h, mod, table, n_txt: int, keep_from: int = 0, kv=None, index: int = 0, shard=None):
        shift, scale, gate = mod
        out = self.attn(modulate(h, shift, scale, self.eps), table, n_txt, keep_from, kv, index, shard)
        h = torch.addcmul(h[:, keep_from:], gate[:, keep_from:] if gate.shape[1] > 1 else gate, out)
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h


class Flux2TimestepGuidanceEmbeddings(nn.Module):
    """``MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g))]`` (the guidance MLP only in guidance-distilled models)."""

    def __init__(self, channels: int, dim: int, guidance_embeds: bool):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedding(channels, dim, bias=False)
        self.guidance_embedder = TimestepEmbedding(channels, dim, bias=False) if guidance_embeds else None

    def forward(self, timestep: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        def embed(mlp, t):
            return mlp(timestep_embedding(t, self.channels, flip_sin_to_cos=True, downscale_freq_shift=0).to(t.dtype))

        emb = embed(self.timestep_embedder, timestep)
        if guidance is not None and self.guidance_embedder is not None:
            emb = emb + embed(self.guidance_embedder, guidance)
        return emb


class Flux2Transformer2DModel(ModelMixin):
    """FLUX.2 denoiser over packed latents ``(B, S, in_channels)``; ``timestep`` is ``t / 1000`` (diffusers'
    convention) and ``guidance`` the raw embedded guidance (dev only). Returns ``(B, S, out_channels)``."""

    diffusers_class_name = "Flux2Transformer2DModel"
    checkpoint_layouts = LAYOUTS

    @classmethod
    def variant_of_config(cls, config) -> str:
        from .flux2_variants import of_config

        return of_config(config)

    @classmethod
    def variant_of_weights(cls, shapes) -> Optional[str]:
        from .flux2_variants import of_weights

        return of_weights(shapes)

    def __init__(self, patch_size: int = 1, in_channels: int = 128, out_channels: Optional[int] = None,
                 num_layers: int = 8, num_single_layers: int = 48, attention_head_dim: int = 128,
                 num_attention_heads: int = 48, joint_attention_dim: int = 15360, timestep_guidance_channels: int = 256,
                 mlp_ratio: float = 3.0, axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32), rope_theta: int = 2000,
                 eps: float = 1e-6, guidance_embeds: bool = True):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"sum(axes_dims_rope)={sum(axes_dims_rope)} must equal attention_head_dim={attention_head_dim}")
        self.out_channels = out_channels or in_channels
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.axes_dims_rope, self.rope_theta, self.eps = tuple(axes_dims_rope), float(rope_theta), eps
        self.guidance_embeds = guidance_embeds
        self.time_guidance_embed = Flux2TimestepGuidanceEmbeddings(timestep_guidance_channels, dim, guidance_embeds)
        self.double_stream_modulation_img = Flux2Modulation(dim, 2)
        self.double_stream_modulation_txt = Flux2Modulation(dim, 2)
        self.single_stream_modulation = Flux2Modulation(dim, 1)
        self.x_embedder = Linear(in_channels, dim, bias=False)
        self.context_embedder = Linear(joint_attention_dim, dim, bias=False)
        args = (dim, num_attention_heads, attention_head_dim, mlp_ratio, eps)
        self.transformer_blocks = nn.ModuleList([Flux2TransformerBlock(*args) for _ in range(num_layers)])
        self.single_transformer_blocks = nn.ModuleList([Flux2SingleTransformerBlock(*args) for _ in range(num_single_layers)])
        self.norm_out = nn.Module()
        self.norm_out.linear = Linear(dim, 2 * dim, bias=False)  # AdaLayerNormContinuous: (scale, shift)
        self.proj_out = Linear(dim, patch_size * patch_size * self.out_channels, bias=False)

    @torch.no_grad()
    def rope(self, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> Rope:
        """RoPE ``(cos, sin)`` over ``[text, image]`` rows, float32, from ``(S, 4)`` ids (float64 math, as diffusers)."""
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        ids = torch.cat([txt_ids, img_ids], dim=0).float()
        device = ids.device
        if device.type in ("mps", "npu"):  # no float64 there
            ids = ids.cpu()
        tables = [rope_frequencies(d, ids[:, i], self.rope_theta) for i, d in enumerate(self.axes_dims_rope)]
        return torch.cat([c for c, _ in tables], -1).to(device), torch.cat([s for _, s in tables], -1).to(device)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                img_ids: Optional[torch.Tensor] = None, txt_ids: Optional[torch.Tensor] = None,
                guidance: Optional[torch.Tensor] = None, rotary_emb: Optional[Rope] = None,
                ref_kv: Optional[RefKV] = None) -> torch.Tensor:
        state = self.cache_embed(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance,
                                 rotary_emb, ref_kv)
        return self.cache_tail(self.cache_blocks(state, 0, self.cache_num_blocks))

    # -- block-cache protocol (diffcore.cache): forward == tail(blocks(embed)) ------------------------
    def _temb(self, timestep, guidance, dtype, batch):
        timestep = timestep.to(dtype).reshape(-1).expand(batch) * 1000
        if guidance is not None:
            guidance = guidance.to(dtype).reshape(-1).expand(batch) * 1000
        return self.time_guidance_embed(timestep, guidance)

    def cache_embed(self, hidden_states, encoder_hidden_states, timestep, img_ids=None, txt_ids=None, guidance=None,
                    rotary_emb=None, ref_kv: Optional[RefKV] = None) -> CacheState:
        """Embeddings and the step's shared modulations; ``state.hidden`` is the image stream."""
        if rotary_emb is None:
            if img_ids is None or txt_ids is None:
                raise ValueError("pass either rotary_emb or both img_ids and txt_ids")
            rotary_emb = self.rope(img_ids, txt_ids)
        batch, n_txt = hidden_states.shape[0], encoder_hidden_states.shape[1]
        temb = self._temb(timestep, guidance, hidden_states.dtype, batch)
        act = F.silu(temb)
        mod_img, mod_txt = self.double_stream_modulation_img(act), self.double_stream_modulation_txt(act)
        mod_single = self.single_stream_modulation(act)
        extra = {"temb": temb, "ctx": self.context_embedder(encoder_hidden_states), "mod_txt": mod_txt, "kv": None,
                 "ref": None}
        shard = None
        if ref_kv is not None and not ref_kv.filled:  # KV extract: references at the fixed timestep
            ref_temb = self._temb(torch.full_like(timestep, ref_kv.ref_timestep), guidance, hidden_states.dtype,
                                     batch)
            ref_act = F.silu(ref_temb)
            n_img, n_ref = hidden_states.shape[1], ref_kv.n_ref
            mod_img = _per_token(mod_img, self.double_stream_modulation_img(ref_act), 0, n_ref, n_img)
            mod_single = _per_token(mod_single, self.single_stream_modulation(ref_act), n_txt, n_ref, n_img)
            extra.update(kv=("extract", ref_kv, n_ref), ref=self.x_embedder(ref_kv.tokens.to(hidden_states.dtype)))
            rope = rotary_table(ref_kv.rope)
        elif ref_kv is not None:
            extra["kv"] = ("cached", ref_kv, ref_kv.n_ref)
            rope = rotary_table(rotary_emb)
        else:
            # sequence parallelism: this rank runs a shard of the image tokens (and their RoPE rows)
            shard = sequence_shard(hidden_states.shape[1])
            rope = rotary_table(rotary_emb)
            if shard is not None:
                hidden_states = shard.split(hidden_states)
                rope = torch.cat([rope[:, :n_txt], shard.split(rope[:, n_txt:])], dim=1)
        extra.update(mod_img=mod_img, mod_single=mod_single, rope=rope)
        return CacheState(hidden=self.x_embedder(hidden_states), extra=extra, shard=shard)

    @property
    def cache_num_blocks(self) -> int:
        return len(self.transformer_blocks) + len(self.single_transformer_blocks)

    def cache_blocks(self, state: CacheState, start: int, stop: int) -> CacheState:
        """Blocks ``[start, stop)``: double-stream first, then single-stream on ``[text, (refs), image]``.

        Running the last block ends the text stream (``extra["ctx"]`` becomes ``None``)."""
        e = state.extra
        x, ctx, ref, kv = state.hidden, e["ctx"], e["ref"], e["kv"]
        store_kv = None if kv is None else lambda blocks: (kv[0], getattr(kv[1], blocks), kv[2])
        n_double = len(self.transformer_blocks)
        for i in range(start, min(stop, n_double)):
            h = x if ref is None else torch.cat([ref, x], dim=1)
            h, ctx = self.transformer_blocks[i](h, ctx, e["mod_img"], e["mod_txt"], e["rope"],
                                                store_kv and store_kv("double"), i, state.shard)
            x, ref = (h, None) if ref is None else (h[:, ref.shape[1]:], h[:, :ref.shape[1]])
        first, last_single = max(start - n_double, 0), max(stop - n_double, 0)
        if last_single > first:
            n_txt, n_ref = ctx.shape[1], 0 if ref is None else ref.shape[1]
            last = stop >= self.cache_num_blocks
            h = torch.cat([ctx, x] if ref is None else [ctx, ref, x], dim=1)
            for j in range(first, last_single):
                keep = n_txt + n_ref if last and j == last_single - 1 else 0
                h = self.single_transformer_blocks[j](h, e["mod_single"], e["rope"], n_txt, keep,
                                                      store_kv and store_kv("single"), j, state.shard)
            if last:
                ctx, ref, x = None, None, h
            else:
                ctx, ref, x = h[:, :n_txt], (h[:, n_txt:n_txt + n_ref] if n_ref else None), h[:, n_txt + n_ref:]
        if stop >= self.cache_num_blocks and kv is not None and kv[0] == "extract":
            kv[1].filled = True
        state.hidden, e["ctx"], e["ref"] = x, ctx, ref
        return state

    def cache_probe(self, state: CacheState) -> torch.Tensor:
        """TeaCache's signal: the first block's timestep-modulated image input."""
        shift, scale = state.extra["mod_img"][:2]
        n = state.hidden.shape[1]
        return modulate(state.hidden, shift[:, -n:] if shift.shape[1] > 1 else shift,
                        scale[:, -n:] if scale.shape[1] > 1 else scale, self.eps)

    def cache_tail(self, state: CacheState) -> torch.Tensor:
        temb = state.extra["temb"]
        scale, shift = self.norm_out.linear(F.silu(temb).to(state.hidden.dtype)).unsqueeze(1).chunk(2, dim=-1)
        out = self.proj_out(modulate(state.hidden, shift, scale, self.eps))
        return out if state.shard is None else state.shard.gather(out)
