"""Building blocks of the causal 3D VAE shared by Wan 2.1/2.2 and Qwen-Image.

Every temporal convolution is causal, so a video can be processed chunk by chunk (encoder: the
first frame, then 4 frames at a time; decoder: one latent frame at a time, and after each temporal
upsampler one frame at a time). A per-call ``cache`` dict, keyed by module, carries what each
causal layer needs from the previous chunk (the last two input frames of a k=3 temporal conv, the
last frame of a strided one, updated in place), which makes chunked processing equal one pass over
the whole video while only one chunk's activations are alive.

Module and parameter names follow diffusers' ``autoencoder_kl_wan.py`` so checkpoints load as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fastpaths
from .attention import attention

class Cache(dict):
    """Per-call state of the causal layers, keyed by module (``True`` marks an upsample3d past its first chunk).

    Set ``store = False`` for a video's last chunk: nothing after it will read the state, so no
    frames are copied into it (for single images no state is kept at all).
    """

    def __init__(self):
        super().__init__()
        self.store = True


def _channels_last(x: torch.Tensor) -> bool:
    """Whether a (B, C, T, H, W) tensor is channels-last (the decoder's layout on the CPU)."""
    return x.is_contiguous(memory_format=torch.channels_last_3d)


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding is all in front (causal); the front frames come from ``cache``.

    Spatial zero padding stays inside the convolution (no padded copy of the input is made). A
    single frame at the causal start only meets the last temporal tap (the others see zeros), so
    it runs as a 2D conv: a third of the work, which is all of it for images.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.time_pad = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if not self.time_pad:
            return self._conv(x)
        prev = cache.get(self) if cache is not None else None
        store = cache is not None and cache.store
        if prev is None and x.shape[2] == 1 and self.stride[0] == 1 and self.kernel_size[0] == self.time_pad + 1:
            if store:
                cache[self] = F.pad(x, (0, 0, 0, 0, self.time_pad - 1, 0))
            w = self.weight[:, :, -1]
            return F.conv2d(x.squeeze(2), w, self.bias, self.stride[1:], self.padding[1:]).unsqueeze(2)
        if prev is None:  # start of the video: zeros, as diffusers' causal padding
            prev = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
        x = torch.cat([prev, x], dim=2)
        if store and self in cache:
            prev.copy_(x[:, :, -self.time_pad :])  # in place: no new long-lived block per chunk on the heap
        elif store:
            cache[self] = x[:, :, -self.time_pad :].clone()
        return self._conv(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last CPU inputs always go to oneDNN: PyTorch's heuristic sends small fp32 3D convs
        (one frame at low resolution) to its unfold kernel, ~2x slower here and channels-first out."""
        if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _channels_last(x)
                and x.dtype == self.weight.dtype and fastpaths.enabled("channels_last_conv", x.dtype)):
            args = (self.padding, self.stride, self.dilation, self.groups)
            try:
                return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, *args)
            except RuntimeError as exc:
                y = super().forward(x)  # a genuine input error raises here, path untouched
                fastpaths.failed("channels_last_conv", x.dtype, exc)
                return y
        return super().forward(x)


class RMSNorm(nn.Module):
    """Channel RMS norm: ``normalize(x, dim=1) * sqrt(dim) * gamma`` (fp32 normalize for half types)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = F.normalize(x, dim=1) * gamma * scale, written per layout for speed on the CPU
        if x.is_contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last):
            # channels innermost: one fp32 reduction, no full-size fp32 copy of a half-precision x
            inv = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12).reciprocal()
            return (x * inv.to(x.dtype)).mul_(self.gamma * self.scale)
        # channels strided: vector_norm's kernel is ~5x slower here than a sum of squares
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf / (xf * xf).sum(1, keepdim=True).sqrt().clamp_min(1e-12)
        return y.to(x.dtype).mul_(self.gamma * self.scale)


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W) for per-frame 2D layers (a view when T == 1).

    T == 1 squeezes instead of reshaping: a reshape can leave size-1 dims with strides that make
    torch see a channels-last frame as channels-first, and copy it back and forth.
    """
    b, c, t, h, w = x.shape
    return x.squeeze(2) if t == 1 else x.transpose(1, 2).reshape(b * t, c, h, w)


def _unframes(y: torch.Tensor, b: int) -> torch.Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W) as a view."""
    return y.unsqueeze(2) if y.shape[0] == b else y.view(b, y.shape[0] // b, *y.shape[1:]).transpose(1, 2)


class Upsample2x(nn.Module):
    """Nearest-exact 2x spatial upsampling (parameter-free slot 0 of ``Resample.resample``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Spatial 2x down/up sampling per frame, with an optional causal temporal 2x (``*3d`` modes).

    downsample3d: the first chunk's frames pass through; later chunks are strided over
    ``[last frame of the previous chunk, chunk]``. upsample3d: the first chunk is not doubled in
    time; later chunks go through a causal conv whose two output halves become frames 2i and 2i+1.
    """

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            out_dim = upsample_out_dim if upsample_out_dim is not None else dim // 2
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, out_dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and self in cache:
            y = self.time_conv(x, cache)
            # (B, 2C, T) -> frames ordered (b, t, half): one copy straight into the per-frame layout
            # (channels-last when x is: a plain reshape would make channels-first frames)
            fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
            frames = torch.empty(b * t * 2, c, h, w, dtype=y.dtype, device=y.device, memory_format=fmt)
            frames.view(b, t, 2, c, h, w).copy_(y.view(b, 2, c, t, h, w).permute(0, 3, 1, 2, 4, 5))
        else:
            if self.mode == "upsample3d":
                cache[self] = True
            frames = _frames(x)
        x = _unframes(self.resample(frames), b)
        if self.mode == "downsample3d":
            last = x[:, :, -1:].clone() if cache.store else None
            if self in cache:
                x = self.time_conv(torch.cat([cache[self], x], dim=2))
            if last is not None:
                cache[self] = last
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(in_dim, images=False)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, images=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = self.conv_shortcut(x)
        x = self.conv1(_silu_(self.norm1(x)), cache)
        x = self.conv2(self.dropout(_silu_(self.norm2(x))), cache)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # contiguous: SDPA takes its flash path (no HW x HW score matrix) only for unit-stride head dims
        qkv = self.to_qkv(self.norm(_frames(x))).flatten(2).transpose(1, 2).contiguous()  # (BT, HW, 3C)
        q, k, v = qkv.unsqueeze(2).chunk(3, dim=-1)  # (BT, HW, 1, C) each
        out = attention(q, k, v).reshape(b * t, h * w, c).transpose(1, 2).reshape(b * t, c, h, w)
        return x + _unframes(self.proj(out), b)


class MidBlock(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0, num_layers: int = 1):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim) for _ in range(num_layers)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout) for _ in range(num_layers + 1)])

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), cache)
        return x


def avg_down(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """Wan 2.2 shortcut: fold a (t, s, s) neighbourhood into channels, then average channel groups.

    A chunk whose frame count is not a multiple of ``factor_t`` gets zero frames in front (the
    first, single-frame chunk), as in diffusers.
    """
    pad = (-x.shape[2]) % factor_t
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    b, c, t, h, w = x.shape
    t, h, w = t // factor_t, h // factor_s, w // factor_s
    group = c * factor_t * factor_s * factor_s // out_channels
    x = x.view(b, c, t, factor_t, h, factor_s, w, factor_s).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, out_channels, group, t, h, w).mean(dim=2)


def dup_up_add_(out: torch.Tensor, x: torch.Tensor, factor_t: int, factor_s: int, first_chunk: bool) -> torch.Tensor:
    """Wan 2.2 shortcut, added in place into ``out``: repeat channels, unfold them into (t, s, s).

    On the first chunk the leading ``factor_t - 1`` frames are dropped (the causal start is not
    doubled in time), matching the upsampler.
    """
    b, c_in, t, h, w = x.shape
    c_out = out.shape[1]
    repeats = c_out * factor_t * factor_s * factor_s // c_in
    sc = x.repeat_interleave(repeats, dim=1).view(b, c_out, factor_t, factor_s, factor_s, t, h, w)
    sc = sc.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (b, c, t, ft, h, fs, w, fs)
    if first_chunk:
        sc = sc[:, :, :, factor_t - 1 :]
    out.view(b, c_out, t, sc.shape[3], h, factor_s, w, factor_s).add_(sc)
    return out


class ResidualDownBlock(nn.Module):
    """Wan 2.2 encoder stage: residual blocks + downsampler, plus a parameter-free avg-down shortcut."""

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, temperal_downsample=False, down_flag=False):
        super().__init__()
        self.out_dim = out_dim
        self.factor_t = 2 if temperal_downsample else 1
        self.factor_s = 2 if down_flag else 1
        if in_dim * self.factor_t * self.factor_s**2 % out_dim:
            raise ValueError(f"in_dim {in_dim} x downsampling factor must be divisible by out_dim {out_dim}")
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks)]
        )
        mode = "downsample3d" if temperal_downsample else "downsample2d"
        self.downsampler = Resample(out_dim, mode) if down_flag else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        shortcut = avg_down(x, self.out_dim, self.factor_t, self.factor_s)
        y = x
        for resnet in self.resnets:
            y = resnet(y, cache)
        if self.downsampler is not None:
            y = self.downsampler(y, cache)
        return y + shortcut if y is x else y.add_(shortcut)


class UpBlock(nn.Module):
    """Wan 2.1 / Qwen-Image decoder stage: ``num_res_blocks + 1`` residual blocks and an optional upsampler."""

    def __init__(self, in_dim, out_dim, num_res_blocks, dropout=0.0, upsample_mode=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)]
        )
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor, cache: Cache, first_chunk: bool = False) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class ResidualUpBlock(nn.Module):
    """Wan 2.2 decoder stage: residual blocks + upsampler, plus a parameter-free dup-up shortcut."""

    def __init__(self, in_dim, out_dim, num_res_blocks, dropout=0.0, temperal_upsample=False, up_flag=False):
        super().__init__()
        self.factor_t = 2 if temperal_upsample else 1
        self.up_flag = up_flag
        if up_flag and out_dim * self.factor_t * 4 % in_dim:
            raise ValueError(f"out_dim {out_dim} x upsampling factor must be divisible by in_dim {in_dim}")
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)]
        )
        mode = "upsample3d" if temperal_upsample else "upsample2d"
        self.upsampler = Resample(out_dim, mode, upsample_out_dim=out_dim) if up_flag else None

    def forward(self, x: torch.Tensor, cache: Cache, first_chunk: bool = False) -> torch.Tensor:
        y = x
        for resnet in self.resnets:
            y = resnet(y, cache)
        if self.upsampler is None:
            return y
        y = self.upsampler(y, cache)
        return dup_up_add_(y, x, self.factor_t, 2, first_chunk)


class Encoder3d(nn.Module):
    def __init__(
        self, in_channels, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample, dropout, is_residual
    ):
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        scale, last = 1.0, len(dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            down, temporal = i != last, i != last and temperal_downsample[i]
            if is_residual:
                self.down_blocks.append(ResidualDownBlock(in_dim, out_dim, dropout, num_res_blocks, temporal, down))
                continue
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    self.down_blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if down:
                self.down_blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
                scale /= 2.0
        self.mid_block = MidBlock(out_dim, dropout)
        self.norm_out = RMSNorm(out_dim, images=False)
        self.conv_out = CausalConv3d(out_dim, z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(_silu_(self.norm_out(x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample, dropout, out_channels, is_residual):
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], dropout)
        self.up_blocks = nn.ModuleList()
        last = len(dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up, temporal = i != last, i != last and temperal_upsample[i]
            if is_residual:
                block = ResidualUpBlock(in_dim, out_dim, num_res_blocks, dropout, temporal, up)
            else:
                # Wan 2.1 upsamplers halve the channels, so every stage after the first gets half
                mode = ("upsample3d" if temporal else "upsample2d") if up else None
                block = UpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, num_res_blocks, dropout, mode)
            self.up_blocks.append(block)
        self.norm_out = RMSNorm(out_dim, images=False)
        self.conv_out = CausalConv3d(out_dim, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: Cache, first_chunk: bool = False) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x, cache), cache)
        frames = list(self._stream(x, 0, cache, first_chunk, cache.store))
        return frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)

    def _stream(self, x, start: int, cache: Cache, first_chunk: bool, store: bool):
        """Yield the output frames of ``up_blocks[start:]`` + head, depth first, one frame at a time.

        Every layer is causal in time, so each frame a temporal upsampler makes can go through the
        rest of the decoder alone (the same arithmetic per output): the full-resolution stages then
        hold one frame's activations instead of four, the largest part of the decode's peak memory.
        All but the last frame of a chunk store causal state for the next.
        """
        cache.store = store
        for i in range(start, len(self.up_blocks)):
            x = self.up_blocks[i](x, cache, first_chunk)
            if x.shape[2] > 1:
                for t in range(x.shape[2]):
                    yield from self._stream(x[:, :, t : t + 1], i + 1, cache, first_chunk, store or t < x.shape[2] - 1)
                return
        yield self.conv_out(_silu_(self.norm_out(x)), cache)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p); channel order (c, p_w, p_h) as diffusers."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"height {h} and width {w} must be divisible by patch_size {p}")
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify_view(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of ``patchify`` as a strided view of shape (B, C, T, H/p, p, W/p, p) (no copy)."""
    b, cp, t, h, w = x.shape
    return x.view(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
