"""The causal 3D video VAE of Wan 2.1 / Wan 2.2 (``AutoencoderKLWan``) and Qwen-Image (``AutoencoderKLQwenImage``).

Encoding runs the first frame, then 4 frames at a time; decoding runs one latent frame at a time
and writes each decoded chunk straight into a preallocated output, so the activations of a
whole video are never held at once. The causal convolutions carry their state between chunks in
a per-call cache (see ``wan_vae_blocks``). Results equal diffusers' non-tiled encode/decode.
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch
from torch import nn

from .. import fastpaths
from .base import DiagonalGaussianDistribution, ModelMixin
from .wan_vae_blocks import Cache, CausalConv3d, Decoder3d, Encoder3d, patchify, unpatchify_view

_LAYOUT_LOCK = threading.Lock()

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


class AutoencoderKLWan(ModelMixin):
    """Wan video VAE. ``is_residual`` + ``patch_size=2`` + ``z_dim=48`` is the Wan 2.2 (TI2V) layout.

    ``encode(x)`` takes (B, C, F, H, W) in [-1, 1] and returns the posterior over
    (B, z_dim, 1 + (F-1)//4, H/s, W/s) latents (trailing frames beyond 1 + 4k are dropped, as in
    diffusers). ``decode(z)`` returns (B, C, 1 + 4(F-1), H*s, W*s) clamped to [-1, 1].
    ``latents_mean``/``latents_std`` are only stored; pipelines normalize latents with them.
    """

    diffusers_class_name = "AutoencoderKLWan"

    def __init__(
        self,
        base_dim: int = 96,
        decoder_base_dim: int | None = None,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temperal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
        latents_mean: Sequence[float] = WAN21_LATENTS_MEAN,
        latents_std: Sequence[float] = WAN21_LATENTS_STD,
        is_residual: bool = False,
        in_channels: int = 3,
        out_channels: int = 3,
        patch_size: int | None = None,
        scale_factor_temporal: int | None = 4,
        scale_factor_spatial: int | None = 8,
        clip_output: bool = True,  # newer diffusers configs carry it; output is always clamped as in diffusers 0.42
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.z_dim = z_dim
        self.patch_size = patch_size
        self.temperal_downsample = tuple(temperal_downsample)
        self.temperal_upsample = self.temperal_downsample[::-1]
        self.temporal_compression_ratio = 2 ** sum(self.temperal_downsample)
        self.spatial_compression_ratio = scale_factor_spatial or 2 ** len(self.temperal_downsample)
        self.latents_mean = list(latents_mean)
        self.latents_std = list(latents_std)

        self.encoder = Encoder3d(
            in_channels, base_dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales,
            self.temperal_downsample, dropout, is_residual,
        )  # fmt: skip
        self.quant_conv = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(
            decoder_base_dim or base_dim, z_dim, dim_mult, num_res_blocks, self.temperal_upsample,
            dropout, out_channels, is_residual,
        )  # fmt: skip
        self.out_channels = out_channels
        self._channels_last = False

    def _use_channels_last(self) -> None:
        """On the CPU, oneDNN convolutions (and the channel RMS norms) run ~20% faster on channels-last
        layouts; the decoder's weights are converted once, on the first decode, under a lock that every
        CPU decode passes before touching a decoder weight (concurrent requests)."""
        if self._channels_last:
            return
        with _LAYOUT_LOCK:
            if self._channels_last:
                return
            for m in [self.post_quant_conv, *self.decoder.modules()]:
                if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    fmt = torch.channels_last_3d if m.weight.ndim == 5 else torch.channels_last
                    m.weight.data = m.weight.data.contiguous(memory_format=fmt)
            self._channels_last = True

    # ------------------------------------------------------------------ encode
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size:
            x = patchify(x, self.patch_size)
        cache = Cache()
        num_chunks = 1 + (x.shape[2] - 1) // 4
        chunks = []
        for i in range(num_chunks):
            cache.store = i < num_chunks - 1
            chunks.append(self.encoder(x[:, :, :1] if i == 0 else x[:, :, 4 * i - 3 : 4 * i + 1], cache))
        return self.quant_conv(torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0])

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Encode a video (B, C, F, H, W) (F = 1 for an image) into the latent posterior."""
        return DiagonalGaussianDistribution(self._encode(x))

    # ------------------------------------------------------------------ decode
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents (B, z_dim, F, h, w) frame by frame into a clamped video (B, C, F', H, W)."""
        b, num_frames = z.shape[0], z.shape[2]
        p = self.patch_size or 1
        channels_last = z.device.type == "cpu" and fastpaths.enabled("channels_last_conv", z.dtype)
        if channels_last:  # before any decoder weight is used: the conversion happens under a lock
            self._use_channels_last()
        x = self.post_quant_conv(z)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        cache = Cache()
        out = None
        t0 = 0
        for i in range(num_frames):
            cache.store = i < num_frames - 1
            chunk = self.decoder(x[:, :, i : i + 1], cache, first_chunk=i == 0).clamp_(-1.0, 1.0)
            if num_frames == 1 and p == 1:
                return chunk  # an image: the chunk is the output
            if out is None:  # allocate once the decoder's output geometry is known
                _, c, _, ho, wo = chunk.shape
                frames = 1 + (num_frames - 1) * self.temporal_compression_ratio
                out = chunk.new_empty(b, c // (p * p), frames, ho * p, wo * p)
            t1 = t0 + chunk.shape[2]
            self._write(out[:, :, t0:t1], chunk)
            t0 = t1
        return out

    def stream_decoder(self) -> "StreamDecoder":
        """Decode a video block by block as its latents become ready (block-causal generation)."""
        return StreamDecoder(self)

    def _write(self, dst: torch.Tensor, chunk: torch.Tensor) -> None:
        """Copy a decoded chunk into its slot of the output, unpatchifying on the way (one copy)."""
        p = self.patch_size or 1
        if p == 1:
            dst.copy_(chunk)
        else:
            b, c, t, hp, wp = dst.shape
            dst.view(b, c, t, hp // p, p, wp // p, p).copy_(unpatchify_view(chunk, p))

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        posterior = self.encode(sample)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())


class StreamDecoder:
    """Incremental ``decode``: consecutive blocks of latent frames in, their video frames out.

    The decoder is causal in time and ``decode`` already runs one latent frame at a time with the
    causal state carried in a ``Cache``; this keeps that cache between calls, so decoding a video
    block by block gives exactly the frames of one ``decode`` of the whole video (the first block
    yields ``1 + 4 (n - 1)`` frames, later ones ``4 n``). Pass ``last=True`` with the final block.
    """

    def __init__(self, vae: AutoencoderKLWan):
        self.vae, self.cache, self.frames_done = vae, Cache(), 0

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, last: bool = False) -> torch.Tensor:
        vae, p = self.vae, self.vae.patch_size or 1
        channels_last = z.device.type == "cpu" and fastpaths.enabled("channels_last_conv", z.dtype)
        if channels_last:  # as in decode: weights converted (under the lock) before any is used
            vae._use_channels_last()
        x = vae.post_quant_conv(z)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        chunks = []
        for i in range(z.shape[2]):
            self.cache.store = not (last and i == z.shape[2] - 1)
            chunk = vae.decoder(x[:, :, i : i + 1], self.cache, first_chunk=self.frames_done == 0).clamp_(-1.0, 1.0)
            self.frames_done += 1
            b, c, t, ho, wo = chunk.shape
            out = chunk.new_empty(b, c // (p * p), t, ho * p, wo * p)
            vae._write(out, chunk)
            chunks.append(out)
        return torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]


class AutoencoderKLQwenImage(AutoencoderKLWan):
    """Qwen-Image's VAE: the Wan 2.1 architecture under another name; ``input_channels`` is both in and out."""

    diffusers_class_name = "AutoencoderKLQwenImage"

    def __init__(
        self,
        base_dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temperal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
        input_channels: int = 3,
        latents_mean: Sequence[float] = WAN21_LATENTS_MEAN,
        latents_std: Sequence[float] = WAN21_LATENTS_STD,
    ):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(
            base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
            attn_scales=attn_scales, temperal_downsample=temperal_downsample, dropout=dropout,
            latents_mean=latents_mean, latents_std=latents_std, in_channels=input_channels,
            out_channels=input_channels, scale_factor_spatial=2 ** len(temperal_downsample),
        )  # fmt: skip
        self.config = config


__all__ = ["AutoencoderKLWan", "AutoencoderKLQwenImage"]
