"""Parity of diffcore's Wan / Qwen-Image causal video VAE against diffusers (the oracle) on tiny perturbed weights."""
from __future__ import annotations

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import diffusers  # noqa: E402  (the test oracle)

from diffcore import fastpaths  # noqa: E402
from diffcore.models.autoencoder_kl_wan import AutoencoderKLQwenImage, AutoencoderKLWan  # noqa: E402

from diffcore.testing.weights import perturb_  # noqa: E402


TINY_WAN21 = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
)  # fmt: skip
TINY_QWEN = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
)  # fmt: skip
# Temporal down/up at the outer stages and dim_mult [1, 1, 2, 2]: the decoder then has a temporal up
# stage that halves channels, so the first chunk's dup-up shortcut depends on which of its two frames
# is kept (with in == out, as in the real config, it would not).
TINY_WAN22 = dict(
    base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=[1, 1, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[True, True, False], is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 8, latents_std=[1.0] * 8,
)  # fmt: skip

CASES = {
    "wan21": (diffusers.AutoencoderKLWan, AutoencoderKLWan, TINY_WAN21, 3),
    "qwenimage": (diffusers.AutoencoderKLQwenImage, AutoencoderKLQwenImage, TINY_QWEN, 3),
    "wan22": (diffusers.AutoencoderKLWan, AutoencoderKLWan, TINY_WAN22, 3),
}

H, W = 32, 48


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convs gain nothing from intra-op threads, and on a shared, busy CPU spinning OpenMP
    workers make this file ~10x slower; restore the setting for other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _metrics(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double().flatten(), b.double().flatten()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item(), (a - b).abs().max().item()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    ref_cls, our_cls, cfg, channels = CASES[request.param]
    torch.manual_seed(0)
    ref = ref_cls(**cfg).eval()
    perturb_(ref, seed=1)
    ours = our_cls.from_config(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return request.param, ref, ours, cfg, channels


@pytest.mark.parametrize("frames", [1, 5, 9])
@torch.no_grad()
def test_encode_matches_diffusers(pair, frames):
    name, ref, ours, cfg, channels = pair
    x = torch.rand(2, channels, frames, H, W, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    want = ref.encode(x).latent_dist
    got = ours.encode(x)
    assert got.mean.shape == want.mean.shape == (2, cfg["z_dim"], 1 + (frames - 1) // 4, H // 8 // (cfg.get("patch_size") or 1), W // 8 // (cfg.get("patch_size") or 1))
    for a, b in ((got.mean, want.mean), (got.logvar, want.logvar)):
        cos, err = _metrics(a, b)
        print(f"{name} encode F={frames}: cos={cos:.8f} max|diff|={err:.2e}")
        assert cos >= 0.99999 and err <= 1e-4


@pytest.mark.parametrize("latent_frames", [1, 2, 3])
@torch.no_grad()
def test_decode_matches_diffusers(pair, latent_frames):
    name, ref, ours, cfg, channels = pair
    p = cfg.get("patch_size") or 1
    z = torch.randn(1, cfg["z_dim"], latent_frames, H // 8 // p, W // 8 // p, generator=torch.Generator().manual_seed(7))
    want = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == want.shape == (1, channels, 1 + 4 * (latent_frames - 1), H, W)
    cos, err = _metrics(got, want)
    print(f"{name} decode F={latent_frames}: cos={cos:.8f} max|diff|={err:.2e}")
    assert cos >= 0.99999 and err <= 1e-4
    assert got.abs().max() <= 1.0  # clamped like diffusers
    assert (got.abs() < 1).float().mean() > 0.1  # not degenerate (everything clamped)


@torch.no_grad()
def test_decode_bfloat16_tracks_fp32(pair, fastpath_mode):
    """A bf16 copy decodes close to diffusers' fp32, with the channels-last oneDNN convolutions and with
    the portable path (plain channels-first convolutions, what bf16 gets on an AVX2-only CPU)."""
    import copy

    name, ref, ours, cfg, channels = pair
    p = cfg.get("patch_size") or 1
    z = torch.randn(1, cfg["z_dim"], 2, H // 8 // p, W // 8 // p, generator=torch.Generator().manual_seed(7))
    low = copy.deepcopy(ours).bfloat16()
    for m in low.modules():  # as freshly loaded: weights in the default layout, no decode yet
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            m.weight.data = m.weight.data.contiguous()
    low._channels_last = False
    got = low.decode(z.bfloat16())
    assert got.dtype == torch.bfloat16
    assert low._channels_last == (fastpath_mode == "fast" and fastpaths.decision("channels_last_conv", torch.bfloat16)[0])
    cos, err = _metrics(got.float(), ref.decode(z).sample)
    print(f"{name} bf16 decode ({fastpath_mode}): cos={cos:.6f} max|diff|={err:.2e}")
    assert cos >= 0.999


@torch.no_grad()
def test_decode_streams_one_latent_frame_at_a_time(pair):
    _, _, ours, cfg, _ = pair
    seen = []
    hook = ours.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    try:
        ours.decode(torch.randn(1, cfg["z_dim"], 3, 2, 3))
    finally:
        hook.remove()
    assert seen == [1, 1, 1]


def test_decode_under_autograd(pair):
    """In-place activations must not break a forward/backward (e.g. for guidance through the VAE)."""
    _, _, ours, cfg, _ = pair
    z = torch.randn(1, cfg["z_dim"], 2, 2, 3, requires_grad=True)
    ours.decode(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


WAN21_REAL = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
)  # fmt: skip
WAN22_REAL = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, clip_output=False,
    latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)  # fmt: skip


@pytest.mark.parametrize(
    "ref_cls,our_cls,cfg",
    [
        (diffusers.AutoencoderKLWan, AutoencoderKLWan, WAN21_REAL),
        (diffusers.AutoencoderKLWan, AutoencoderKLWan, WAN22_REAL),
        (diffusers.AutoencoderKLQwenImage, AutoencoderKLQwenImage, WAN21_REAL),
    ],
    ids=["wan21", "wan22", "qwenimage"],
)
def test_real_config_state_dict_matches_on_meta(ref_cls, our_cls, cfg):
    ref_cfg = {k: v for k, v in cfg.items() if k in inspect.signature(ref_cls.__init__).parameters}
    with torch.device("meta"):
        ref = ref_cls(**ref_cfg)
    ours = our_cls.from_config({"_class_name": our_cls.diffusers_class_name, **cfg}, device="meta")
    want = {(k, tuple(v.shape)) for k, v in ref.state_dict().items()}
    got = {(k, tuple(v.shape)) for k, v in ours.state_dict().items()}
    assert got == want
    assert all(p.is_meta for p in ours.parameters())


@pytest.mark.parametrize("c_in,c_out,ft,fs", [(8, 16, 2, 2), (8, 8, 2, 2), (8, 16, 1, 2), (16, 8, 2, 2), (16, 8, 1, 2), (6, 12, 2, 1)])
@pytest.mark.parametrize("frames", [1, 4])
def test_wan22_shortcuts_match_diffusers(c_in, c_out, ft, fs, frames):
    """The parameter-free avg-down / dup-up shortcuts, over channel ratios the tiny models do not reach."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import AvgDown3D, DupUp3D

    from diffcore.models.wan_vae_blocks import avg_down, dup_up_add_

    g = torch.Generator().manual_seed(frames)
    x = torch.randn(2, c_in, frames, 4, 6, generator=g)
    if c_in * ft * fs * fs % c_out == 0:
        torch.testing.assert_close(avg_down(x, c_out, ft, fs), AvgDown3D(c_in, c_out, ft, fs)(x), rtol=0, atol=1e-6)
    if c_out * ft * fs * fs % c_in == 0:
        for first in (False, True) if frames == 1 else (False,):
            want = DupUp3D(c_in, c_out, ft, fs)(x, first_chunk=first)
            base = torch.randn(want.shape, generator=g)
            got = dup_up_add_(base.clone(), x, ft, fs, first)
            torch.testing.assert_close(got, base + want, rtol=0, atol=1e-6)
