"""ZImageTransformer2DModel: Z-Image's single-stream DiT (parameter names equal diffusers').

    latents (B, 16, H, W) -> 2x2 patches -> all_x_embedder -> image tokens, padded to a multiple of 32 with the
        learned x_pad_token -> noise_refiner (modulated blocks, image tokens only)
    caption states (L_i, 2560) per row -> cap_embedder (RMSNorm + Linear) -> padded to a multiple of 32 with
        cap_pad_token -> context_refiner (unmodulated blocks, caption only)
    [image, caption] per row (rows padded to the longest, masked) -> layers -> all_final_layer -> unpatchify

Blocks: sandwich RMSNorms around attention and the SwiGLU MLP, scale-only adaLN from a 256-d timestep embedding
with tanh gates, QK RMSNorm, 3-axis complex RoPE (caption position 1+i; image (L_cap_padded + 1, h, w); image
padding (0, 0, 0)). The model's time runs 0 = noise -> 1 = clean (the pipeline passes 1 - sigma).

Everything that depends only on the request (caption lengths, RoPE rows, masks) is built once per request by
``layout`` and passed in at every step; the block-cache protocol (``cache_embed`` / ``cache_blocks`` /
``cache_tail``) runs the main layers, with the refiners in the embedding.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from diffcore.cache.base import CacheState
from diffcore.errors import SamplingParamError
from diffcore.models.attention import attention
from diffcore.models.base import ModelMixin
from diffcore.models.dit import rotate
from diffcore.models.embeddings import timestep_embedding
from diffcore.models.linear import Linear
from diffcore.parallel import sequence_shard
from diffcore.models.norms import RMSNorm

from .key_layouts import LAYOUTS

ADALN_EMBED_DIM = 256
SEQ_MULTI_OF = 32


def padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


class TimestepEmbedder(nn.Module):
    """Sinusoid (cos, sin) of 256 channels -> MLP 256 -> 1024 -> ``out_size`` (``mlp.0`` / ``mlp.2``)."""

    def __init__(self, out_size: int, mid_size: int = 1024):
        super().__init__()
        self.mlp = nn.Sequential(Linear(256, mid_size), nn.SiLU(), Linear(mid_size, out_size))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        freqs = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.mlp(freqs.to(dtype))


class Attention(nn.Module):
    """Self-attention with QK RMSNorm (eps 1e-5, as diffusers builds it) and complex RoPE; no biases."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, head_dim = heads, dim // heads
        self.to_q, self.to_k, self.to_v = (Linear(dim, dim, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps=1e-5), RMSNorm(head_dim, eps=1e-5)
        self.to_out = nn.ModuleList([Linear(dim, dim, bias=False)])

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor], shard=None,
                queries: Optional[int] = None) -> torch.Tensor:
        """``queries``: only the first ``queries`` rows ask (every row still serves as key and value)."""
        xq = x if queries is None else x[:, :queries]
        q = self.norm_q(self.to_q(xq).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        v = self.to_v(x).unflatten(-1, (self.heads, -1))
        q, k = rotate(q, rope if queries is None else rope[:, :queries]), rotate(k, rope)
        return self.to_out[0](attention(q, k, v, attn_mask=mask, shard=shard).flatten(2).to(x.dtype))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(dim, hidden_dim, bias=False), Linear(hidden_dim, dim, bias=False), \
            Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ZImageTransformerBlock(nn.Module):
    """Sandwich-normed attention + SwiGLU; with ``modulation``, scale-only adaLN and tanh gates from the timestep."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float, modulation: bool = True):
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1, self.ffn_norm1 = RMSNorm(dim, eps=norm_eps), RMSNorm(dim, eps=norm_eps)
        self.attention_norm2, self.ffn_norm2 = RMSNorm(dim, eps=norm_eps), RMSNorm(dim, eps=norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(Linear(min(dim, ADALN_EMBED_DIM), 4 * dim))

    def modulations(self, adaln: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        return 1.0 + scale_msa, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()

    def forward(self, x, rope, mask, adaln: Optional[torch.Tensor] = None, shard=None,
                queries: Optional[int] = None) -> torch.Tensor:
        """With ``queries``, returns the first ``queries`` rows only (the others serve as keys and values)."""
        rows = x if queries is None else x[:, :queries]
        if not self.modulation:
            x = rows + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask, shard, queries))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulations(adaln)
        attn = self.attention(self.attention_norm1(x) * scale_msa, rope, mask, shard, queries)
        x = rows + gate_msa * self.attention_norm2(attn)
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(min(dim, ADALN_EMBED_DIM), dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(adaln).unsqueeze(1)
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale)


@attrs.frozen
class RopeSpec:
    """The checkpoint's RoPE: per-axis dims, table lengths (``axes_lens``: the largest position) and theta."""

    axes_dims: tuple[int, ...]
    axes_lens: tuple[int, ...]
    theta: float

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, 3) integer positions -> per-pair [cos, sin] (N, D/2, 2): diffusers' tables indexed by ``ids``."""
        parts = []
        for axis, (d, n) in enumerate(zip(self.axes_dims, self.axes_lens)):
            pos = ids[:, axis]
            if int(pos.max()) >= n:
                param, what = (("max_sequence_length", "caption"), ("height", "image height"),
                               ("width", "image width"))[axis]
                raise SamplingParamError(param, f"the {what} needs RoPE position {int(pos.max())}, beyond this "
                                                f"checkpoint's axes_lens[{axis}] = {n}; use a smaller size or prompt")
            freqs = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
            angles = torch.outer(pos.to(torch.float64), freqs).float()
            parts.append(torch.stack([angles.cos(), angles.sin()], dim=-1))
        return torch.cat(parts, dim=1)


@attrs.frozen
class ZImageLayout:
    """Per-request constants of one branch: caption lengths, RoPE tables and masks of every sequence."""

    spec: RopeSpec
    cap_lens: tuple[int, ...]
    grid: tuple[int, int]  # (H/2, W/2) image tokens
    x_rope: torch.Tensor  # (B, Nx, 1, D/2, 2): image tokens (the same grid for every row, its frame index per row)
    cap_rope: torch.Tensor  # (B, Lc, 1, D/2, 2): the longest padded caption
    cap_mask: Optional[torch.Tensor]  # (B, 1, 1, Lc) bool; None when every padded caption has the same length
    rope: torch.Tensor  # (B, Nx + Lc, 1, D/2, 2): [image, caption] per row
    mask: Optional[torch.Tensor]  # (B, 1, 1, Nx + Lc) bool
    # what the model computed once for this request and reuses at every step (``ZImageTransformer2DModel.captions``)
    memo: dict = attrs.field(factory=dict, eq=False, repr=False)

    def rows(self, index: Sequence[int]) -> "ZImageLayout":
        """The layout of a subset of the rows (their own longest caption)."""
        return build_layout(self.spec, [self.cap_lens[i] for i in index], self.grid, self.x_rope.device)


def build_layout(spec: RopeSpec, cap_lens: Sequence[int], grid: tuple[int, int], device=None) -> ZImageLayout:
    """RoPE tables and masks for rows with these caption lengths and an image grid of (H/2, W/2) tokens.

    Positions as diffusers': caption token i (padding included) at (1 + i, 0, 0); image token (h, w) at
    (L_cap_padded + 1, h, w); image padding at (0, 0, 0). Rows are right-padded to the longest and masked."""
    gh, gw = grid
    n_img = gh * gw
    nx = padded(n_img)
    cap_padded = [padded(n) for n in cap_lens]
    lc = max(cap_padded)
    hw = torch.stack(torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device),
                                    indexing="ij"), dim=-1).reshape(n_img, 2)
    x_rope, cap_rope, rope = [], [], []
    for lp in cap_padded:
        img = torch.cat([torch.full((n_img, 1), lp + 1, device=device), hw], dim=1)
        img = torch.cat([img, torch.zeros(nx - n_img, 3, dtype=img.dtype, device=device)])
        cap = torch.zeros(lp, 3, dtype=img.dtype, device=device)
        cap[:, 0] = torch.arange(1, lp + 1, device=device)
        x_rows, cap_rows = spec.rows(img), spec.rows(cap)
        x_rope.append(x_rows)
        cap_rope.append(F.pad(cap_rows, (0, 0, 0, 0, 0, lc - lp)))
        rope.append(F.pad(torch.cat([x_rows, cap_rows]), (0, 0, 0, 0, 0, lc - lp)))
    cap_mask = mask = None
    if any(lp != lc for lp in cap_padded):
        keys = torch.arange(lc, device=device)[None, :] < torch.tensor(cap_padded, device=device)[:, None]
        cap_mask = keys[:, None, None, :]
        mask = torch.cat([torch.ones(len(cap_lens), nx, dtype=torch.bool, device=device), keys], dim=1)[:, None, None]
    return ZImageLayout(spec=spec, cap_lens=tuple(cap_lens), grid=(gh, gw), x_rope=torch.stack(x_rope)[:, :, None],
                        cap_rope=torch.stack(cap_rope)[:, :, None], cap_mask=cap_mask,
                        rope=torch.stack(rope)[:, :, None], mask=mask)


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors (e.g. weights re-laid out for oneDNN under inference_mode) track none
        return None


def _same_weights(saved: list, weights: list) -> bool:
    """``saved`` ((weakref, version) pairs) describes ``weights``: the same objects, unchanged where tracked."""
    return len(saved) == len(weights) and all(ref() is w and v == _version(w) for (ref, v), w in zip(saved, weights))


class ZImageTransformer2DModel(ModelMixin):
    diffusers_class_name = "ZImageTransformer2DModel"
    checkpoint_layouts = LAYOUTS

    def __init__(self, all_patch_size=(2,), all_f_patch_size=(1,), in_channels: int = 16, dim: int = 3840,
                 n_layers: int = 30, n_refiner_layers: int = 2, n_heads: int = 30, n_kv_heads: int = 30,
                 norm_eps: float = 1e-5, qk_norm: bool = True, cap_feat_dim: int = 2560, rope_theta: float = 256.0,
                 t_scale: float = 1000.0, axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512)):
        super().__init__()
        if tuple(all_patch_size) != (2,) or tuple(all_f_patch_size) != (1,):
            raise ValueError(f"only 2x2 (frame 1) patches are supported, got all_patch_size={all_patch_size}, "
                             f"all_f_patch_size={all_f_patch_size}")
        if n_kv_heads != n_heads or not qk_norm:
            raise ValueError("Z-Image checkpoints use n_kv_heads == n_heads and qk_norm (as diffusers' class does)")
        if dim // n_heads != sum(axes_dims):
            raise ValueError(f"head dim {dim // n_heads} must equal sum(axes_dims) = {sum(axes_dims)}")
        self.in_channels, self.dim, self.n_heads = in_channels, dim, n_heads
        self.t_scale = t_scale
        self.rope_spec = RopeSpec(tuple(axes_dims), tuple(axes_lens), float(rope_theta))
        self.all_x_embedder = nn.ModuleDict({"2-1": Linear(4 * in_channels, dim)})
        self.all_final_layer = nn.ModuleDict({"2-1": FinalLayer(dim, 4 * in_channels)})
        self.noise_refiner = nn.ModuleList([ZImageTransformerBlock(dim, n_heads, norm_eps) for _ in range(n_refiner_layers)])
        self.context_refiner = nn.ModuleList([ZImageTransformerBlock(dim, n_heads, norm_eps, modulation=False)
                                              for _ in range(n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM), mid_size=1024)
        self.cap_embedder = nn.Sequential(RMSNorm(cap_feat_dim, eps=norm_eps), Linear(cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.cap_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.layers = nn.ModuleList([ZImageTransformerBlock(dim, n_heads, norm_eps) for _ in range(n_layers)])

    def layout(self, cap_lens: Sequence[int], grid: tuple[int, int], device=None) -> ZImageLayout:
        """Per-request RoPE tables and masks (``build_layout``), built once and passed in at every step."""
        return build_layout(self.rope_spec, cap_lens, grid, device)

    # ---- forward = tail(blocks(embed)) --------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                layout: ZImageLayout) -> torch.Tensor:
        """``hidden_states`` (B, C, H, W) latents; ``timestep`` (B,) in [0, 1] (1 = clean);
        ``encoder_hidden_states`` (B, L, cap_feat_dim), row i's first ``layout.cap_lens[i]`` rows real.
        Returns the model output (B, C, H, W), in diffusers' sign (the pipeline negates it)."""
        state = self.cache_embed(hidden_states, timestep, encoder_hidden_states, layout)
        return self.cache_tail(self.cache_blocks(state, 0, self.cache_num_blocks))

    def cache_embed(self, hidden_states, timestep, encoder_hidden_states, layout: ZImageLayout) -> CacheState:
        """Patchify and embed both streams, run the refiners, build the unified [image, caption] sequence."""
        b, c, h, w = hidden_states.shape
        gh, gw = h // 2, w // 2
        n_img, nx = gh * gw, padded(gh * gw)
        dtype = self.dtype  # the compute dtype (a GGUF file may hold the pad tokens packed)
        adaln = self.t_embedder(timestep.float().reshape(-1).expand(b) * self.t_scale, dtype)
        patches = hidden_states.to(dtype).view(b, c, gh, 2, gw, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, 4 * c)
        x = self.all_x_embedder["2-1"](patches)
        x = torch.cat([x, self.x_pad_token.expand(b, nx - n_img, -1)], dim=1)
        for block in self.noise_refiner:
            x = block(x, layout.x_rope, None, adaln)

        unified = torch.cat([x, self.captions(encoder_hidden_states, layout)], dim=1)
        rope, shard = layout.rope, sequence_shard(unified.shape[1])
        if shard is not None:  # sequence parallelism: this rank runs a shard of the unified sequence
            unified, rope = shard.split(unified), shard.split(rope)
        return CacheState(hidden=unified, extra={"adaln": adaln, "rope": rope, "mask": layout.mask,
                                                 "size": (c, h, w), "n_image": n_img}, shard=shard)

    def captions(self, encoder_hidden_states: torch.Tensor, layout: ZImageLayout) -> torch.Tensor:
        """The caption stream after ``cap_embedder`` and the context refiner: (B, Lc, dim), pad tokens included.

        It depends on neither the latents nor the timestep, so it is computed at the first step of a request
        and reused from ``layout.memo`` at the others: for the same ``encoder_hidden_states`` tensor and the
        same weights (each weight's identity and, where tracked, version counter are compared, so weights
        replaced or changed in place, e.g. by a fused LoRA, recompute it)."""
        weights = self._caption_weights()
        hit = layout.memo.get("captions")
        if hit is not None and hit[0] is encoder_hidden_states and _same_weights(hit[1], weights):
            return hit[2]
        lc = layout.cap_rope.shape[1]
        cap = self.cap_embedder(encoder_hidden_states.to(self.dtype)[:, : max(layout.cap_lens)])
        keep = torch.arange(lc, device=cap.device)[None, :] < torch.tensor(layout.cap_lens, device=cap.device)[:, None]
        cap = torch.where(keep[..., None], F.pad(cap, (0, 0, 0, lc - cap.shape[1])), self.cap_pad_token)
        for block in self.context_refiner:
            cap = block(cap, layout.cap_rope, layout.cap_mask)
        if not torch.is_grad_enabled():
            saved = [(weakref.ref(w), _version(w)) for w in self._caption_weights()]  # after any re-packing
            layout.memo["captions"] = (encoder_hidden_states, saved, cap)
        return cap

    def _caption_weights(self) -> list:
        return [*self.cap_embedder.parameters(), *self.context_refiner.parameters(), self.cap_pad_token]

    @property
    def cache_num_blocks(self) -> int:
        return len(self.layers)

    def cache_blocks(self, state: CacheState, start: int, stop: int) -> CacheState:
        """Main layers ``[start, stop)``. ``cache_tail`` reads the image rows only, so the last layer computes
        queries, output projection and MLP for those (without sequence parallelism, where a rank's shard mixes
        both); its caption rows pass through unchanged, keeping the shape the step caches' residuals need."""
        e = state.extra
        last = len(self.layers) - 1
        for i in range(start, min(stop, len(self.layers))):
            n = e["n_image"] if i == last and state.shard is None else None
            out = self.layers[i](state.hidden, e["rope"], e["mask"], e["adaln"], shard=state.shard, queries=n)
            state.hidden = out if n is None else torch.cat([out, state.hidden[:, n:]], dim=1)
        return state

    def cache_probe(self, state: CacheState) -> torch.Tensor:
        """TeaCache's signal: the first layer's timestep-scaled input."""
        scale_msa = self.layers[0].modulations(state.extra["adaln"])[0]
        return self.layers[0].attention_norm1(state.hidden) * scale_msa

    def cache_tail(self, state: CacheState) -> torch.Tensor:
        out = self.all_final_layer["2-1"](state.hidden, state.extra["adaln"])
        if state.shard is not None:
            out = state.shard.gather(out)
        c, h, w = state.extra["size"]
        b, gh, gw = out.shape[0], h // 2, w // 2
        out = out[:, : gh * gw].reshape(b, gh, gw, 2, 2, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, h, w)
