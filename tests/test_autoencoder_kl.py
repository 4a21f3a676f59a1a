"""Parity of diffcore's AutoencoderKL against diffusers (the numerics oracle) on tiny perturbed weights."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from diffcore.models import attention as attn_mod
from diffcore.models.autoencoder_kl import AutoencoderKL
from diffcore.models.base import DiagonalGaussianDistribution

import diffusers  # noqa: E402  (the test oracle)

from diffcore.testing.weights import perturb_  # noqa: E402


TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[8, 16],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)

FLUX_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def _stats(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    cos = F.cosine_similarity(ours.flatten().double(), ref.flatten().double(), dim=0).item()
    return cos, (ours - ref).abs().max().item()


def _assert_close(ours, ref, what):
    cos, diff = _stats(ours, ref)
    print(f"{what}: cos={cos:.9f} max|diff|={diff:.3e}")
    assert cos >= 0.99999, (what, cos)
    assert diff <= 1e-4, (what, diff)


def _pair(**overrides):
    cfg = {**TINY, **overrides}
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**cfg).eval()
    perturb_(ref, seed=1)
    ours = AutoencoderKL.from_config({"_class_name": "AutoencoderKL", **cfg}).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


CASES = {
    "quant_convs": dict(),
    "no_quant_convs": dict(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    "no_mid_attention": dict(mid_block_add_attention=False),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_parity_with_diffusers(case):
    ours, ref = _pair(**CASES[case])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 24, 40, generator=g)
    z = torch.randn(2, 4, 12, 20, generator=g)

    post = ours.encode(x)
    ref_post = ref.encode(x).latent_dist
    assert isinstance(post, DiagonalGaussianDistribution)
    _assert_close(post.mean, ref_post.mean, f"{case} encode mean")
    _assert_close(post.logvar, ref_post.logvar, f"{case} encode logvar")

    out = ours.decode(z)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 24, 40)
    _assert_close(out, ref.decode(z).sample, f"{case} decode")

    _assert_close(ours(x), ref(x).sample, f"{case} forward")


@torch.no_grad()
def test_state_dict_keys_and_config_attrs():
    ours, ref = _pair(**CASES["no_quant_convs"])
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "encoder.mid_block.attentions.0.to_q.weight" in ours.state_dict()
    assert "quant_conv.weight" not in ours.state_dict()
    assert ours.scaling_factor == 0.3611 and ours.shift_factor == 0.1159
    assert ours.spatial_compression_ratio == 2


@torch.no_grad()
def test_math_backend_and_channels_last():
    """The mid-block attention goes through diffcore's dispatcher, and channels_last layouts give the same result."""
    ours, ref = _pair()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 24, 40, generator=g)
    z = torch.randn(2, 4, 12, 20, generator=g)
    expected_dec = ref.decode(z).sample
    expected_mean = ref.encode(x).latent_dist.mean

    calls = []

    def spy(q, k, v, attn_mask=None, scale=None):
        calls.append(q.shape)
        return attn_mod._math(q, k, v, attn_mask=attn_mask, scale=scale)

    attn_mod.register_backend("spy_math", spy)
    with attn_mod.use_backend("spy_math"):
        _assert_close(ours.decode(z), expected_dec, "math-backend decode")
    assert calls == [torch.Size([2, 12 * 20, 1, 16])], calls  # one single-head call at latent resolution

    ours = ours.to(memory_format=torch.channels_last)
    out = ours.decode(z.contiguous(memory_format=torch.channels_last))
    _assert_close(out, expected_dec, "channels_last decode")
    mean = ours.encode(x.contiguous(memory_format=torch.channels_last)).mean
    _assert_close(mean, expected_mean, "channels_last encode mean")


def test_grad_path_does_not_break_autograd():
    """In-place activations must switch off when autograd needs the inputs."""
    ours, ref = _pair()
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    ours(x).square().mean().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sample.square().mean().backward()
    _assert_close(x.grad, x2.grad, "input grad")


def test_rejects_unsupported_blocks():
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        AutoencoderKL(**{**TINY, "down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="block_out_channels"):
        AutoencoderKL(**{**TINY, "block_out_channels": [8, 16, 16]})


def test_flux_config_on_meta_matches_diffusers():
    ours = AutoencoderKL.from_config(FLUX_VAE, device="meta")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**{k: v for k, v in FLUX_VAE.items() if not k.startswith("_")})
    ours_shapes = {(k, tuple(v.shape)) for k, v in ours.state_dict().items()}
    ref_shapes = {(k, tuple(v.shape)) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes, (sorted(ours_shapes - ref_shapes)[:5], sorted(ref_shapes - ours_shapes)[:5])
    assert all(p.is_meta for p in ours.parameters())
    assert "quant_conv.weight" not in dict(ours_shapes) and "post_quant_conv.weight" not in dict(ours_shapes)
    assert ("decoder.up_blocks.0.resnets.2.conv2.weight", (512, 512, 3, 3)) in ours_shapes
    assert ours.config["scaling_factor"] == 0.3611 and ours.shift_factor == 0.1159
    assert ours.spatial_compression_ratio == 8
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) and 80_000_000 < n < 90_000_000
