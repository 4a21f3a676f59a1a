"""The 2-D KL autoencoder (SD / SDXL / FLUX VAE) with diffusers' ``AutoencoderKL`` parameter names.

Numerics follow diffusers' ``Encoder``/``Decoder`` (vae.py), ``ResnetBlock2D``, ``Downsample2D``,
``Upsample2D`` and the single-head mid-block ``Attention``. Only the block types that real KL
checkpoints use are built (``DownEncoderBlock2D`` / ``UpDecoderBlock2D``).

Memory: inference is the common case, so activations are applied in place whenever autograd does
not need the original tensor, every block keeps only its input (for the residual) and one working
tensor, and no layout assumption is made (``channels_last`` weights and inputs work unchanged).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .base import DiagonalGaussianDistribution, ModelMixin

_EPS = 1e-6  # every norm in the KL VAE uses this eps


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``act(x)`` that overwrites ``x`` when nothing needs the pre-activation value.

    The caller passes a freshly produced tensor (a norm output) that it does not use again.
    """
    name = name.lower()
    inplace_fns = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "relu": F.relu}
    if name in inplace_fns:
        fn = inplace_fns[name]
        return lambda x: fn(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported act_fn {name!r}; expected one of silu, swish, mish, relu, gelu")


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block without time embedding: ``x + conv2(act(norm2(conv1(act(norm1(x))))))``."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.act = _activation(act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut)  # h is this block's own conv output: safe to overwrite


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after asymmetric (right/bottom) zero padding, as the LDM VAE was trained."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() * 4 >= 2**31:  # upsample_nearest2d indexes with int32 on non-contiguous inputs
            x = x.contiguous()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with a GroupNorm in front and a residual around it.

    Names match diffusers' ``Attention(_from_deprecated_attn_block=True)``: group_norm, to_q/k/v, to_out.0.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, HW, C); a free view when x is channels_last.
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q = self.to_q(tokens).unsqueeze(2)
        k = self.to_k(tokens).unsqueeze(2)
        v = self.to_v(tokens).unsqueeze(2)
        del tokens
        out = attention(q, k, v)
        del q, k, v
        out = self.to_out[0](out.reshape(b, h * w, c))
        return out.view(b, h, w, c).permute(0, 3, 1, 2).add_(x)


class UNetMidBlock2D(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        # registration order matches diffusers so state_dict() iterates in the same key order
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, act_fn) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image -> moments (2 * latent_channels: mean and log-variance)."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, act_fn, mid_attention):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            last = i == len(block_out_channels) - 1
            self.down_blocks.append(DownEncoderBlock2D(prev, ch, layers_per_block, groups, act_fn, not last))
            prev = ch
        self.mid_block = UNetMidBlock2D(prev, groups, act_fn, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, prev, eps=_EPS)
        self.conv_out = nn.Conv2d(prev, 2 * latent_channels, 3, padding=1)
        self.act = _activation("silu")  # diffusers hard-codes SiLU here, whatever act_fn says

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent -> image; each up block has ``layers_per_block + 1`` resnets."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups, act_fn, mid_attention):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block, as in diffusers (state_dict order)
        self.mid_block = UNetMidBlock2D(rev[0], groups, act_fn, mid_attention)
        prev = rev[0]
        for i, ch in enumerate(rev):
            last = i == len(rev) - 1
            self.up_blocks.append(UpDecoderBlock2D(prev, ch, layers_per_block + 1, groups, act_fn, not last))
            prev = ch
        self.conv_norm_out = nn.GroupNorm(groups, prev, eps=_EPS)
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)
        self.act = _activation("silu")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(ModelMixin):
    """KL-regularised image autoencoder; state-dict keys equal diffusers' ``AutoencoderKL``.

    ``encode`` returns the posterior over *unscaled* latents and ``decode`` takes unscaled latents,
    exactly like diffusers: pipelines apply ``(z - shift_factor) * scaling_factor`` (and the
    inverse before decoding) themselves, reading the factors stored on this module.
    """

    diffusers_class_name = "AutoencoderKL"

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | Sequence[int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: Optional[float] = None,
        latents_mean: Optional[Sequence[float]] = None,
        latents_std: Optional[Sequence[float]] = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        n = len(block_out_channels)
        if len(down_block_types) != n or len(up_block_types) != n:
            raise ValueError(f"need one down and one up block per entry of block_out_channels ({n})")
        for kind, expected in ((down_block_types, "DownEncoderBlock2D"), (up_block_types, "UpDecoderBlock2D")):
            bad = [t for t in kind if t != expected]
            if bad:
                raise ValueError(f"AutoencoderKL supports only {expected} blocks, got {bad}")
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types), block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
            shift_factor=shift_factor, latents_mean=latents_mean, latents_std=latents_std,
            force_upcast=force_upcast, use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.latent_channels = latent_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.latents_mean = latents_mean
        self.latents_std = latents_std
        self.force_upcast = force_upcast

        args = (block_out_channels, layers_per_block, norm_num_groups, act_fn, mid_block_add_attention)
        self.encoder = Encoder(in_channels, latent_channels, *args)
        self.decoder = Decoder(latent_channels, out_channels, *args)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    @property
    def spatial_compression_ratio(self) -> int:
        """Pixels per latent along each side (8 for the 4-level SD/FLUX VAEs)."""
        return 2 ** (len(self.encoder.down_blocks) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images ``(B, C, H, W)`` (in [-1, 1]) -> posterior over unscaled latents."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``(B, latent_channels, h, w)`` -> images ``(B, out_channels, 8h, 8w)``-ish."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, sample: torch.Tensor, sample_posterior: bool = False, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Reconstruct ``sample`` (posterior mode unless ``sample_posterior``)."""
        posterior = self.encode(sample)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        del posterior
        return self.decode(z)
