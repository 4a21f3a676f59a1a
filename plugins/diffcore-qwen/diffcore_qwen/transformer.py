"""Qwen-Image MMDiT (diffusers ``QwenImageTransformer2DModel``), parameter names identical to diffusers.

Dual-stream blocks: image and text tokens keep separate weights (adaLN modulation, QKV, MLP) but
attend jointly over ``[text, image]``. Positions use a 3-axis (frame, height, width) RoPE whose
height/width axes are centred on the image (``scale_rope``); text tokens sit on the diagonal just
after the largest image half-extent.

Per-step work is kept lean (numerics follow diffusers; fp32 parity is tested against it):

* The RoPE tables only depend on the request's shapes: ``rope()`` builds them once per request and
  ``forward(rotary_emb=...)`` reuses them every step; RoPE is applied as one complex multiply.
* ``silu(temb)`` is computed once per call and shared by every block's modulation.
* AdaLN modulation is one ``layer_norm`` with the per-sample ``(1 + scale)`` / ``shift`` as its affine
  for one sample (``addcmul`` otherwise); gated residuals are ``addcmul``.
* Token-wise projections use ``diffcore.models.linear`` (oneDNN GEMMs on the CPU, GELU fused into
  the MLP's first GEMM).
* The model returns only the image stream, so the last block stops its text stream after attention
  (no ``to_add_out``, text residual or text MLP there).

Sequence parallelism (Ulysses, ``diffcore.parallel``): each rank runs a shard of the image tokens
(with their RoPE rows and condition-token flags) and the whole text stream; joint attention
all-to-alls to head shards of the full sequence and back; ``cache_tail`` gathers the output.

The model implements diffcore's block-cache protocol (``cache_embed`` / ``cache_blocks`` /
``cache_tail``, see ``diffcore.cache``) and ``forward`` is exactly their composition, so step caches
(FBCache, TeaCache) reuse the same code path.
"""
from __future__ import annotations

from math import prod
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.cache.base import CacheState
from diffcore.models.attention import attention
from diffcore.loader.key_layouts import CheckpointLayout
from diffcore.models.base import ModelMixin
from diffcore.models.embeddings import TimestepEmbedding, Timesteps
from diffcore.models.dit import FeedForward, modulate, rotary_table, rotate
from diffcore.models.linear import Linear
from diffcore.parallel import sequence_shard
from diffcore.models.norms import RMSNorm

Shape3 = tuple[int, int, int]
RopeTables = tuple[torch.Tensor, torch.Tensor]



class QwenTimestepProjEmbeddings(nn.Module):
    """Sinusoidal timestep (scaled by 1000) -> MLP; optionally plus a learned 2-way embedding (Qwen-Image-Layered)."""

    def __init__(self, embedding_dim: int, use_additional_t_cond: bool = False):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)
        self.use_additional_t_cond = use_additional_t_cond
        if use_additional_t_cond:
            self.addition_t_embedding = nn.Embedding(2, embedding_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype, addition_t_cond: Optional[torch.Tensor] = None):
        emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        if self.use_additional_t_cond:
            if addition_t_cond is None:
                raise ValueError("this model has use_additional_t_cond=True: pass additional_t_cond (0/1 per sample)")
            emb = emb + self.addition_t_embedding(addition_t_cond).to(dtype)
        return emb


def _mod_params(params: torch.Tensor, cond_tokens: Optional[torch.Tensor] = None):
    """``(shift, scale, gate)`` from ``params`` ``(B, 3D)``, each ``(B, 1, D)``.

    With ``cond_tokens`` (zero_cond_t) ``params`` has ``2B`` rows: the first ``B`` (real timestep) modulate the
    generated image, the last ``B`` (timestep 0) the condition-image tokens marked True; each is then ``(B, S, D)``.
    """
    shift, scale, gate = params.unsqueeze(1).chunk(3, dim=-1)
    if cond_tokens is not None:
        b = shift.shape[0] // 2
        shift, scale, gate = (torch.where(cond_tokens, t[b:], t[:b]) for t in (shift, scale, gate))
    return shift, scale, gate


class QwenJointAttention(nn.Module):
    """Joint attention: per-stream QKV + per-head RMS q/k norms, RoPE and softmax over ``[text, image]``."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = Linear(inner, dim)

    def forward(self, img, txt, rope: torch.Tensor, attn_mask: Optional[torch.Tensor], txt_out: bool = True,
                shard=None):
        """``(image output, text output)``; the text output is ``None`` when ``txt_out`` is False.
        ``shard``: sequence parallelism (``img`` is one shard, ``txt`` whole on every rank)."""
        split = lambda t: t.unflatten(-1, (-1, self.head_dim))  # noqa: E731  (B, S, H, D)
        q = torch.cat([self.norm_added_q(split(self.add_q_proj(txt))), self.norm_q(split(self.to_q(img)))], dim=1)
        k = torch.cat([self.norm_added_k(split(self.add_k_proj(txt))), self.norm_k(split(self.to_k(img)))], dim=1)
        v = torch.cat([split(self.add_v_proj(txt)), split(self.to_v(img))], dim=1)
        q, k = rotate(q, rope), rotate(k, rope)
        out = attention(q, k, v, attn_mask=attn_mask, shard=shard).flatten(2, 3).to(q.dtype)
        n_txt = txt.shape[1]
        img_out = self.to_out[0](out[:, n_txt:].contiguous())
        return img_out, (self.to_add_out(out[:, :n_txt].contiguous()) if txt_out else None)


class QwenImageTransformerBlock(nn.Module):
    """One dual-stream MMDiT block (pre-norm adaLN, joint attention, per-stream MLP, gated residuals)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6,
                 zero_cond_t: bool = False):
        super().__init__()
        self.zero_cond_t = zero_cond_t
        self.img_mod = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        self.attn = QwenJointAttention(dim, num_attention_heads, attention_head_dim, eps)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def forward(self, img, txt, temb_act, rope: torch.Tensor, attn_mask=None, cond_tokens=None, txt_out: bool = True,
                shard=None):
        """``temb_act`` is ``silu(temb)``. With ``txt_out=False`` (last block: the model discards the text
        stream) only the image stream is updated and the returned text stream is ``None``."""
        img_mod1, img_mod2 = self.img_mod[1](temb_act).chunk(2, dim=-1)
        txt_temb = temb_act.chunk(2, dim=0)[0] if self.zero_cond_t else temb_act
        txt_mod1, txt_mod2 = self.txt_mod[1](txt_temb).chunk(2, dim=-1)

        shift, scale, gate = _mod_params(img_mod1, cond_tokens)
        c_shift, c_scale, c_gate = _mod_params(txt_mod1)
        img_attn, txt_attn = self.attn(modulate(img, shift, scale), modulate(txt, c_shift, c_scale), rope,
                                       attn_mask, txt_out, shard)
        img = torch.addcmul(img, gate, img_attn)
        shift, scale, gate = _mod_params(img_mod2, cond_tokens)
        img = torch.addcmul(img, gate, self.img_mlp(modulate(img, shift, scale)))
        if img.dtype == torch.float16:  # diffusers clips to keep fp16 finite
            img = img.clip(-65504, 65504)
        if not txt_out:
            return img, None

        txt = torch.addcmul(txt, c_gate, txt_attn)
        c_shift, c_scale, c_gate = _mod_params(txt_mod2)
        txt = torch.addcmul(txt, c_gate, self.txt_mlp(modulate(txt, c_shift, c_scale)))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class AdaLayerNormContinuous(nn.Module):
    """Final adaLN (no affine): ``LN(x) * (1 + scale) + shift`` with ``scale, shift = linear(silu(temb))``."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """``temb_act`` is the already-activated ``silu(temb)``."""
        scale, shift = self.linear(temb_act.to(x.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return modulate(x, shift, scale)


def _sample_shapes(img_shapes) -> list[Shape3]:
    """Normalise ``img_shapes`` to one sample's list of ``(frames, h, w)`` (diffusers' accepted forms).

    Accepts ``(f, h, w)``, a per-batch list of ``(f, h, w)`` or a per-batch list of lists (several images per
    sample, edit models). Like diffusers the RoPE is shared across the batch, so samples must agree.
    """
    if isinstance(img_shapes, list):
        if any(s != img_shapes[0] for s in img_shapes):
            raise ValueError(f"all batch items must share img_shapes (RoPE is shared over the batch); got {img_shapes}")
        img_shapes = img_shapes[0]
    shapes = img_shapes if isinstance(img_shapes, list) else [img_shapes]
    return [tuple(int(v) for v in s) for s in shapes]


class QwenImageTransformer2DModel(ModelMixin):
    """Qwen-Image / Qwen-Image-Edit(-2509/-2511) / Qwen-Image-Layered denoiser.

    ``forward`` takes packed latents ``(B, S_img, in_channels)`` (all images of a sample concatenated, the generated
    one first) and text states ``(B, S_txt, joint_attention_dim)`` and returns ``(B, S_img, p*p*out_channels)``.
    """

    diffusers_class_name = "QwenImageTransformer2DModel"
    # Qwen-Image was released with Diffusers names and its single-file checkpoints (city96's GGUFs) keep them,
    # full checkpoints under ``model.diffusion_model.`` (the loader strips it); declared so such files are recognised.
    checkpoint_layouts = (CheckpointLayout("Qwen-Image Diffusers names", (r"transformer_blocks\.\d+\.img_mod\.1\.weight",
                                                                          r"txt_norm\.weight")),)

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: Optional[int] = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        pooled_projection_dim: Optional[int] = None,  # present in released configs, unused (as in diffusers)
    ):
        super().__init__()
        if guidance_embeds:
            # diffusers 0.42.1 builds no guidance embedder and its forward fails when given guidance
            raise NotImplementedError("QwenImageTransformer2DModel: guidance_embeds=True is not supported "
                                      "(no released Qwen-Image checkpoint uses it; diffusers has no guidance path)")
        if len(axes_dims_rope) != 3 or any(d % 2 for d in axes_dims_rope) or sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must be 3 even sizes summing to "
                             f"attention_head_dim={attention_head_dim}")
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.axes_dims_rope = tuple(int(d) for d in axes_dims_rope)
        self.zero_cond_t, self.use_layer3d_rope = zero_cond_t, use_layer3d_rope
        self.rope_theta = 10000.0

        self.time_text_embed = QwenTimestepProjEmbeddings(self.inner_dim, use_additional_t_cond)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = Linear(in_channels, self.inner_dim)
        self.txt_in = Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim, zero_cond_t=zero_cond_t)
            for _ in range(num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim)
        self.proj_out = Linear(self.inner_dim, patch_size * patch_size * self.out_channels)

    # ------------------------------------------------------------------ RoPE (per request)
    def _axis_angles(self, axis: int, positions: torch.Tensor) -> torch.Tensor:
        """fp32 angles exactly as diffusers forms them (fp32 inverse frequencies, fp32 outer product)."""
        dim = self.axes_dims_rope[axis]
        inv_freq = 1.0 / torch.pow(self.rope_theta, torch.arange(0, dim, 2, device=positions.device).float().div(dim))
        return torch.outer(positions.float(), inv_freq)

    def _image_angles(self, frames: int, height: int, width: int, frame_start: int, device) -> torch.Tensor:
        """(f*h*w, head_dim/2) angles; height/width positions centred: ``arange(n) - (n - n // 2)``."""
        ar = lambda n, start: torch.arange(start, start + n, device=device)  # noqa: E731
        f = self._axis_angles(0, ar(frames, frame_start))
        h = self._axis_angles(1, ar(height, -(height - height // 2)))
        w = self._axis_angles(2, ar(width, -(width - width // 2)))
        grid = (frames, height, width)
        return torch.cat([f[:, None, None].expand(*grid, -1), h[None, :, None].expand(*grid, -1),
                          w[None, None, :].expand(*grid, -1)], dim=-1).reshape(prod(grid), -1)

    def rope(self, img_shapes, txt_seq_len: int, device=None) -> RopeTables:
        """Real ``(cos, sin)`` tables ``(txt_seq_len + S_img, head_dim)`` fp32, rows in joint ``[text, image]`` order.

        Image ``i`` of a sample gets frame positions starting at ``i`` (layer3d RoPE: the last, condition image
        gets frame ``-1``); text token ``j`` gets position ``max_index + j`` on all axes, ``max_index`` being the
        largest ``h // 2`` / ``w // 2`` (and, for layer3d, the layer count). Compute once per request.
        """
        shapes = _sample_shapes(img_shapes)
        n_last = len(shapes) - 1
        parts, max_index = [], 0
        for i, (f, h, w) in enumerate(shapes):
            if self.use_layer3d_rope and i == n_last:
                if f != 1:
                    raise ValueError(f"layer3d RoPE: the condition image must have 1 frame, got {f}")
                parts.append(self._image_angles(f, h, w, -1, device))
            else:
                parts.append(self._image_angles(f, h, w, i, device))
            max_index = max(max_index, h // 2, w // 2)
        if self.use_layer3d_rope:
            max_index = max(max_index, n_last)
        txt_pos = torch.arange(max_index, max_index + int(txt_seq_len), device=device)
        txt = torch.cat([self._axis_angles(a, txt_pos) for a in range(3)], dim=-1)
        angles = torch.cat([txt, *parts], dim=0)
        return angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)

    def condition_token_mask(self, img_shapes, device=None) -> Optional[torch.Tensor]:
        """zero_cond_t only: ``(1, S_img, 1)`` bool, True on condition-image tokens (all but the first image)."""
        if not self.zero_cond_t:
            return None
        shapes = _sample_shapes(img_shapes)
        n_first = prod(shapes[0])
        return (torch.arange(sum(prod(s) for s in shapes), device=device) >= n_first)[None, :, None]

    # ------------------------------------------------------------------ denoiser
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: Optional[torch.Tensor] = None,
        timestep: Optional[torch.Tensor] = None,
        img_shapes=None,
        rotary_emb: Optional[RopeTables] = None,
        additional_t_cond: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for the image tokens.

        ``timestep`` is the pipeline's ``t / 1000`` (1-D, one per sample). ``encoder_hidden_states_mask``
        ``(B, S_txt)`` (1/True = real token) masks padded text keys; pass ``None`` when nothing is padded.
        ``rotary_emb`` is ``self.rope(img_shapes, S_txt)`` precomputed per request; ``img_shapes`` is needed
        when it is not given, and for zero_cond_t models.
        """
        state = self.cache_embed(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                                 img_shapes, rotary_emb, additional_t_cond)
        return self.cache_tail(self.cache_blocks(state, 0, self.cache_num_blocks))

    # -- block-cache protocol (diffcore.cache): forward == tail(blocks(embed)) ------------------------
    def cache_embed(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, timestep=None,
                    img_shapes=None, rotary_emb=None, additional_t_cond=None) -> CacheState:
        """Embeddings and per-call conditioning; ``state.hidden`` is the image stream."""
        batch, n_txt = encoder_hidden_states.shape[:2]
        n_img = hidden_states.shape[1]
        # Sequence parallelism: this rank runs a shard of the image tokens (see diffcore.parallel);
        # cache_tail gathers the prediction. n_img stays the global count (RoPE, masks).
        shard = sequence_shard(n_img)
        img = self.img_in(hidden_states if shard is None else shard.split(hidden_states))
        dtype = img.dtype
        timestep = timestep.to(dtype)
        cond_tokens = None
        if self.zero_cond_t:
            if img_shapes is None:
                raise ValueError("zero_cond_t models need img_shapes to find the condition-image tokens")
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            cond_tokens = self.condition_token_mask(img_shapes, img.device)
        temb = self.time_text_embed(timestep, dtype, additional_t_cond)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))

        if rotary_emb is None:
            if img_shapes is None:
                raise ValueError("pass img_shapes or precomputed rotary_emb (see rope())")
            rotary_emb = self.rope(img_shapes, n_txt, device=img.device)
        if rotary_emb[0].shape[0] != n_txt + n_img:
            raise ValueError(f"rotary_emb covers {rotary_emb[0].shape[0]} tokens, inputs have {n_txt} text + "
                             f"{n_img} image tokens; img_shapes must describe every image token")

        attn_mask = None
        if encoder_hidden_states_mask is not None:
            if encoder_hidden_states_mask.shape != (batch, n_txt):
                raise ValueError(f"encoder_hidden_states_mask {tuple(encoder_hidden_states_mask.shape)} "
                                 f"must be (batch, text_len)=({batch}, {n_txt})")
            img_keys = torch.ones(batch, n_img, dtype=torch.bool, device=img.device)
            attn_mask = torch.cat([encoder_hidden_states_mask.to(torch.bool), img_keys], dim=1)[:, None, None, :]
        rope = rotary_table(rotary_emb)
        if shard is not None:  # per-token tensors of the image stream follow its shard; text stays whole
            rope = torch.cat([rope[:, :n_txt], shard.split(rope[:, n_txt:])], dim=1)
            cond_tokens = None if cond_tokens is None else shard.split(cond_tokens)
        extra = {"txt": txt, "temb_act": F.silu(temb), "rope": rope, "attn_mask": attn_mask, "cond_tokens": cond_tokens}
        return CacheState(hidden=img, extra=extra, shard=shard)

    @property
    def cache_num_blocks(self) -> int:
        return len(self.transformer_blocks)

    def cache_blocks(self, state: CacheState, start: int, stop: int) -> CacheState:
        """Blocks ``[start, stop)``; the model's last block leaves ``extra["txt"]`` as ``None`` (unused by the tail)."""
        img, e = state.hidden, state.extra
        txt = e["txt"]
        last = len(self.transformer_blocks) - 1
        for i in range(start, stop):
            img, txt = self.transformer_blocks[i](img, txt, e["temb_act"], e["rope"], e["attn_mask"],
                                                  e["cond_tokens"], txt_out=i < last, shard=state.shard)
        state.hidden, e["txt"] = img, txt
        return state

    def cache_probe(self, state: CacheState) -> torch.Tensor:
        """TeaCache's signal: the first block's timestep-modulated image input."""
        block = self.transformer_blocks[0]
        shift, scale, _ = _mod_params(block.img_mod[1](state.extra["temb_act"]).chunk(2, dim=-1)[0],
                                      state.extra["cond_tokens"])
        return modulate(state.hidden, shift, scale)

    def cache_tail(self, state: CacheState) -> torch.Tensor:
        temb_act = state.extra["temb_act"]
        if self.zero_cond_t:
            temb_act = temb_act.chunk(2, dim=0)[0]
        out = self.proj_out(self.norm_out(state.hidden, temb_act))
        return out if state.shard is None else state.shard.gather(out)
