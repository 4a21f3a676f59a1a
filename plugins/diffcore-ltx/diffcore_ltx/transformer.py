"""LTX-2 audio-video DiT (diffusers' ``LTX2VideoTransformer3DModel``, same parameter names and numerics).

Two token streams run side by side through every block: video tokens (one per latent voxel) and audio
tokens (one per latent audio frame). Each block does, per stream, AdaLN-modulated self-attention, text
cross-attention and a feed-forward, and between them a pair of cross-modal attentions (audio->video and
video->audio) whose queries and keys are rotated by their stream's *time* only, so sound and picture meet
at the same second. Positions are [start, end) boxes in pixels / seconds (``rope.py``).

Guidance variants are arguments of ``forward`` as in diffusers: ``isolate_modalities`` switches the
cross-modal attentions off (modality guidance), ``spatio_temporal_guidance_blocks`` + ``perturbation_mask``
replace self-attention by its values in the named blocks (STG; only with ``perturbed_attn``, as LTX-2.3).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.models.base import ModelMixin
from diffcore.models.dit import FeedForward
from diffcore.models.embeddings import TimestepEmbedding, timestep_embedding
from diffcore.models.linear import Linear

from .attention import LTX2Attention, Rope, rms
from .rope import AudioVideoRope


class AdaLayerNormSingle(nn.Module):
    """PixArt-style timestep embedding (``emb.timestep_embedder``) and ``k`` modulation vectors (``linear``)."""

    def __init__(self, dim: int, num_mod_params: int):
        super().__init__()
        self.emb = nn.Module()
        self.emb.timestep_embedder = TimestepEmbedding(256, dim)
        self.linear = Linear(dim, num_mod_params * dim)

    def forward(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, k*D) modulation and (B, T, D) embedding; T is 1 or one per token (per-token timesteps)."""
        emb = self.emb.timestep_embedder(timestep_embedding(timestep.flatten(), 256, True, 0).to(dtype))
        return self.linear(F.silu(emb)).view(batch, -1, self.linear.out_features), emb.view(batch, -1, emb.shape[-1])


class TextProjection(nn.Module):
    """``caption_projection``: Linear, GELU(tanh), Linear (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1, self.linear_2 = Linear(in_features, hidden), Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def mod_params(table: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``table`` (k, D) plus the per-sample (B, T, k*D) embedding, split into k (B, T, D) tensors."""
    k = table.shape[0]
    return (table[None, None].to(temb.device) + temb.reshape(temb.shape[0], temb.shape[1], k, -1)).unbind(2)


def _feed_forward(dim: int, bias: bool) -> FeedForward:
    ff = FeedForward(dim)
    if not bias:
        for layer in (ff.net[0].proj, ff.net[2]):
            layer.bias = None
    return ff


class LTX2VideoTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, cross_dim: int, audio_dim: int, audio_heads: int,
                 audio_head_dim: int, audio_cross_dim: int, gated: bool, cross_mod: bool, audio_gated: bool,
                 audio_cross_mod: bool, bias: bool, out_bias: bool, eps: float, perturbed_attn: bool,
                 ff_bias: bool, audio_ff_bias: bool):
        super().__init__()
        self.eps, self.perturbed_attn = eps, perturbed_attn
        self.cross_mod, self.audio_cross_mod = cross_mod, audio_cross_mod
        kw = dict(bias=bias, out_bias=out_bias)
        self.attn1 = LTX2Attention(dim, heads, head_dim, gated=gated, **kw)
        self.audio_attn1 = LTX2Attention(audio_dim, audio_heads, audio_head_dim, gated=audio_gated, **kw)
        self.attn2 = LTX2Attention(dim, heads, head_dim, cross_dim, gated=gated, **kw)
        self.audio_attn2 = LTX2Attention(audio_dim, audio_heads, audio_head_dim, audio_cross_dim, gated=audio_gated, **kw)
        self.audio_to_video_attn = LTX2Attention(dim, audio_heads, audio_head_dim, audio_dim, gated=gated, **kw)
        self.video_to_audio_attn = LTX2Attention(audio_dim, audio_heads, audio_head_dim, dim, gated=audio_gated, **kw)
        self.ff = _feed_forward(dim, ff_bias)
        self.audio_ff = _feed_forward(audio_dim, audio_ff_bias)
        self.scale_shift_table = nn.Parameter(torch.randn(9 if cross_mod else 6, dim) / dim ** 0.5)
        self.audio_scale_shift_table = nn.Parameter(torch.randn(9 if audio_cross_mod else 6, audio_dim) / audio_dim ** 0.5)
        if cross_mod or audio_cross_mod:
            self.prompt_scale_shift_table = nn.Parameter(torch.randn(2, dim))
            self.audio_prompt_scale_shift_table = nn.Parameter(torch.randn(2, audio_dim))
        self.video_a2v_cross_attn_scale_shift_table = nn.Parameter(torch.randn(5, dim))
        self.audio_a2v_cross_attn_scale_shift_table = nn.Parameter(torch.randn(5, audio_dim))

    def _prompt_kv(self, table: torch.Tensor, temb_prompt: Optional[torch.Tensor], like: torch.Tensor):
        if temb_prompt is not None:
            return mod_params(table, temb_prompt)
        return table[None, None].to(like.device, like.dtype).unbind(2)

    def forward(self, x, a, ctx, a_ctx, temb, a_temb, ca_temb, a_ca_temb, ca_gate, a_ca_gate, prompt_temb,
                a_prompt_temb, rope: Rope, a_rope: Rope, ca_rope: Rope, a_ca_rope: Rope, mask, a_mask,
                cross_modal: bool, perturb: Optional[torch.Tensor]):
        eps = self.eps
        v_mod, a_mod = mod_params(self.scale_shift_table, temb), mod_params(self.audio_scale_shift_table, a_temb)
        perturb = perturb if self.perturbed_attn else None
        # self-attention, per stream
        x = x + self.attn1(rms(x, eps) * (1 + v_mod[1]) + v_mod[0], q_rope=rope, perturb=perturb) * v_mod[2]
        a = a + self.audio_attn1(rms(a, eps) * (1 + a_mod[1]) + a_mod[0], q_rope=a_rope, perturb=perturb) * a_mod[2]
        # text cross-attention (LTX-2.3: query and key/value modulated too)
        if self.cross_mod or self.audio_cross_mod:
            shift_kv, scale_kv = self._prompt_kv(self.prompt_scale_shift_table, prompt_temb, x)
            a_shift_kv, a_scale_kv = self._prompt_kv(self.audio_prompt_scale_shift_table, a_prompt_temb, a)
            ctx, a_ctx = ctx * (1 + scale_kv) + shift_kv, a_ctx * (1 + a_scale_kv) + a_shift_kv
        q = rms(x, eps)
        q = q * (1 + v_mod[7]) + v_mod[6] if self.cross_mod else q
        out = self.attn2(q, ctx, mask)
        x = x + (out * v_mod[8] if self.cross_mod else out)
        q = rms(a, eps)
        q = q * (1 + a_mod[7]) + a_mod[6] if self.audio_cross_mod else q
        out = self.audio_attn2(q, a_ctx, a_mask)
        a = a + (out * a_mod[8] if self.audio_cross_mod else out)
        # audio <-> video cross-attention, each side rotated by its own time
        if cross_modal:
            nx, na = rms(x, eps), rms(a, eps)
            v_scale_a2v, v_shift_a2v, v_scale_v2a, v_shift_v2a = mod_params(self.video_a2v_cross_attn_scale_shift_table[:4], ca_temb)
            a_scale_a2v, a_shift_a2v, a_scale_v2a, a_shift_v2a = mod_params(self.audio_a2v_cross_attn_scale_shift_table[:4], a_ca_temb)
            a2v_gate = mod_params(self.video_a2v_cross_attn_scale_shift_table[4:], ca_gate)[0]
            v2a_gate = mod_params(self.audio_a2v_cross_attn_scale_shift_table[4:], a_ca_gate)[0]
            a2v = self.audio_to_video_attn(nx * (1 + v_scale_a2v) + v_shift_a2v, na * (1 + a_scale_a2v) + a_shift_a2v,
                                           q_rope=ca_rope, k_rope=a_ca_rope)
            v2a = self.video_to_audio_attn(na * (1 + a_scale_v2a) + a_shift_v2a, nx * (1 + v_scale_v2a) + v_shift_v2a,
                                           q_rope=a_ca_rope, k_rope=ca_rope)
            x, a = x + a2v_gate * a2v, a + v2a_gate * v2a
        x = x + self.ff(rms(x, eps) * (1 + v_mod[4]) + v_mod[3]) * v_mod[5]
        a = a + self.audio_ff(rms(a, eps) * (1 + a_mod[4]) + a_mod[3]) * a_mod[5]
        return x, a


class LTX2VideoTransformer3DModel(ModelMixin):
    diffusers_class_name = "LTX2VideoTransformer3DModel"

    def __init__(self, in_channels: int = 128, out_channels: Optional[int] = 128, patch_size: int = 1,
                 patch_size_t: int = 1, num_attention_heads: int = 32, attention_head_dim: int = 128,
                 cross_attention_dim: int = 4096, vae_scale_factors: tuple = (8, 32, 32), pos_embed_max_pos: int = 20,
                 base_height: int = 2048, base_width: int = 2048, gated_attn: bool = False, cross_attn_mod: bool = False,
                 audio_in_channels: int = 128, audio_out_channels: Optional[int] = 128, audio_patch_size: int = 1,
                 audio_patch_size_t: int = 1, audio_num_attention_heads: int = 32, audio_attention_head_dim: int = 64,
                 audio_cross_attention_dim: int = 2048, audio_scale_factor: int = 4, audio_pos_embed_max_pos: int = 20,
                 audio_sampling_rate: int = 16000, audio_hop_length: int = 160, audio_gated_attn: bool = False,
                 audio_cross_attn_mod: bool = False, num_layers: int = 48, activation_fn: str = "gelu-approximate",
                 qk_norm: str = "rms_norm_across_heads", norm_elementwise_affine: bool = False, norm_eps: float = 1e-6,
                 caption_channels: int = 3840, attention_bias: bool = True, attention_out_bias: bool = True,
                 rope_theta: float = 10000.0, rope_double_precision: bool = True, causal_offset: int = 1,
                 timestep_scale_multiplier: int = 1000, cross_attn_timestep_scale_multiplier: int = 1000,
                 rope_type: str = "interleaved", use_prompt_embeddings: bool = True, perturbed_attn: bool = False,
                 ff_bias: bool = True, audio_ff_bias: bool = True, use_prompt_adaln_single: bool = True,
                 use_keyframes_abs_pos_embedding: bool = False):
        super().__init__()
        from diffcore.errors import ConfigError

        if activation_fn != "gelu-approximate" or qk_norm != "rms_norm_across_heads" or norm_elementwise_affine:
            raise ConfigError("LTX2VideoTransformer3DModel: only activation_fn 'gelu-approximate', qk_norm "
                              "'rms_norm_across_heads' and norm_elementwise_affine false exist in LTX-2 checkpoints")
        dim, audio_dim = num_attention_heads * attention_head_dim, audio_num_attention_heads * audio_attention_head_dim
        self.use_prompt_embeddings = use_prompt_embeddings
        self.gate_scale = cross_attn_timestep_scale_multiplier / timestep_scale_multiplier
        self.prompt_modulation = (cross_attn_mod or audio_cross_attn_mod) and use_prompt_adaln_single
        self.proj_in = Linear(in_channels, dim)
        self.audio_proj_in = Linear(audio_in_channels, audio_dim)
        if use_keyframes_abs_pos_embedding:
            self.keyframes_abs_pos_embedding = nn.Parameter(torch.zeros(1, dim))
        if use_prompt_embeddings:
            self.caption_projection = TextProjection(caption_channels, dim)
            self.audio_caption_projection = TextProjection(caption_channels, audio_dim)
        self.time_embed = AdaLayerNormSingle(dim, 9 if cross_attn_mod else 6)
        self.audio_time_embed = AdaLayerNormSingle(audio_dim, 9 if audio_cross_attn_mod else 6)
        self.av_cross_attn_video_scale_shift = AdaLayerNormSingle(dim, 4)
        self.av_cross_attn_audio_scale_shift = AdaLayerNormSingle(audio_dim, 4)
        self.av_cross_attn_video_a2v_gate = AdaLayerNormSingle(dim, 1)
        self.av_cross_attn_audio_v2a_gate = AdaLayerNormSingle(audio_dim, 1)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.audio_scale_shift_table = nn.Parameter(torch.randn(2, audio_dim) / audio_dim ** 0.5)
        if self.prompt_modulation:
            self.prompt_adaln = AdaLayerNormSingle(dim, 2)
            self.audio_prompt_adaln = AdaLayerNormSingle(audio_dim, 2)
        self.positions = AudioVideoRope(
            dim=dim, audio_dim=audio_dim, cross_dim=audio_cross_attention_dim, heads=num_attention_heads,
            audio_heads=audio_num_attention_heads, patch_size=patch_size, patch_size_t=patch_size_t,
            audio_patch_size_t=audio_patch_size_t, max_pos=pos_embed_max_pos, audio_max_pos=audio_pos_embed_max_pos,
            base_height=base_height, base_width=base_width, scale_factors=tuple(vae_scale_factors),
            audio_scale_factor=audio_scale_factor, sampling_rate=audio_sampling_rate, hop_length=audio_hop_length,
            theta=rope_theta, causal_offset=causal_offset, rope_type=rope_type, double_precision=rope_double_precision)
        self.transformer_blocks = nn.ModuleList([LTX2VideoTransformerBlock(
            dim, num_attention_heads, attention_head_dim, cross_attention_dim, audio_dim, audio_num_attention_heads,
            audio_attention_head_dim, audio_cross_attention_dim, gated_attn, cross_attn_mod, audio_gated_attn,
            audio_cross_attn_mod, attention_bias, attention_out_bias, norm_eps, perturbed_attn, ff_bias, audio_ff_bias,
        ) for _ in range(num_layers)])
        self.proj_out = Linear(dim, out_channels or in_channels)
        self.audio_proj_out = Linear(audio_dim, audio_out_channels or audio_in_channels)

    def forward(self, hidden_states: torch.Tensor, audio_hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor, audio_encoder_hidden_states: torch.Tensor,
                timestep: torch.Tensor, audio_timestep: Optional[torch.Tensor] = None,
                sigma: Optional[torch.Tensor] = None, audio_sigma: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                audio_encoder_attention_mask: Optional[torch.Tensor] = None, num_frames: Optional[int] = None,
                height: Optional[int] = None, width: Optional[int] = None, fps: float = 24.0,
                audio_num_frames: Optional[int] = None, video_coords: Optional[torch.Tensor] = None,
                audio_coords: Optional[torch.Tensor] = None, isolate_modalities: bool = False,
                spatio_temporal_guidance_blocks: Optional[list] = None,
                perturbation_mask: Optional[torch.Tensor] = None, use_cross_timestep: bool = False,
                rotary_emb: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity predictions for the video and audio tokens. ``rotary_emb`` (``self.positions.tables``) may be
        passed precomputed, since it depends only on the request's sizes, not on the step."""
        b, dtype = hidden_states.shape[0], hidden_states.dtype
        audio_timestep = audio_timestep if audio_timestep is not None else timestep
        audio_sigma = audio_sigma if audio_sigma is not None else sigma
        mask = _additive(encoder_attention_mask, dtype)
        a_mask = _additive(audio_encoder_attention_mask, audio_hidden_states.dtype)
        if rotary_emb is None:
            if video_coords is None:
                video_coords = self.positions.video_coords(b, num_frames, height, width, hidden_states.device, fps)
            if audio_coords is None:
                audio_coords = self.positions.audio_coords(b, audio_num_frames, hidden_states.device)
            rotary_emb = self.positions.tables(video_coords, audio_coords)
        rope, a_rope, ca_rope, a_ca_rope = rotary_emb
        x, a = self.proj_in(hidden_states), self.audio_proj_in(audio_hidden_states)
        adt = a.dtype
        temb, emb = self.time_embed(timestep, b, dtype)
        a_temb, a_emb = self.audio_time_embed(audio_timestep, b, adt)
        prompt_temb = a_prompt_temb = None
        if self.prompt_modulation:
            prompt_temb = self.prompt_adaln(sigma, b, dtype)[0]
            a_prompt_temb = self.audio_prompt_adaln(audio_sigma, b, adt)[0]
        v_ca_t = audio_sigma.flatten() if use_cross_timestep else timestep.flatten()
        a_ca_t = sigma.flatten() if use_cross_timestep else audio_timestep.flatten()
        ca_temb = self.av_cross_attn_video_scale_shift(v_ca_t, b, dtype)[0]
        ca_gate = self.av_cross_attn_video_a2v_gate(v_ca_t * self.gate_scale, b, dtype)[0]
        a_ca_temb = self.av_cross_attn_audio_scale_shift(a_ca_t, b, adt)[0]
        a_ca_gate = self.av_cross_attn_audio_v2a_gate(a_ca_t * self.gate_scale, b, adt)[0]
        ctx, a_ctx = encoder_hidden_states, audio_encoder_hidden_states
        if self.use_prompt_embeddings:
            ctx = self.caption_projection(ctx).view(b, -1, x.shape[-1])
            a_ctx = self.audio_caption_projection(a_ctx).view(b, -1, a.shape[-1])
        stg = set(spatio_temporal_guidance_blocks or ())
        if stg and perturbation_mask is None:
            perturbation_mask = torch.zeros(b)
        if perturbation_mask is not None:
            perturbation_mask = perturbation_mask.to(x.device).reshape(-1, 1, 1)
        for i, block in enumerate(self.transformer_blocks):
            x, a = block(x, a, ctx, a_ctx, temb, a_temb, ca_temb, a_ca_temb, ca_gate, a_ca_gate, prompt_temb,
                         a_prompt_temb, rope, a_rope, ca_rope, a_ca_rope, mask, a_mask, not isolate_modalities,
                         perturbation_mask if i in stg else None)
        return self._out(x, emb, self.scale_shift_table, self.proj_out), \
            self._out(a, a_emb, self.audio_scale_shift_table, self.audio_proj_out)

    @staticmethod
    def _out(x: torch.Tensor, emb: torch.Tensor, table: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        shift, scale = (table[None, None] + emb[:, :, None]).unbind(2)
        return proj(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift)


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A (B, S) keep-mask as diffusers' additive (B, 1, 1, S) bias: 0 to attend, -10000 to ignore."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]
