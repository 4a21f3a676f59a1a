"""What keeps the Wan VAE decode's peak memory low: full-resolution stages run one frame at a time,
causal state is updated in place, and convolutions see channels-last inputs (no reordered copies)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffcore import fastpaths
from diffcore.models.autoencoder_kl_wan import AutoencoderKLWan
from diffcore.models.wan_vae_blocks import Cache, CausalConv3d

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY).eval()


@torch.no_grad()
def test_decoder_head_runs_one_frame_at_a_time(vae):
    seen = []
    handle = vae.decoder.conv_out.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    try:
        out = vae.decode(torch.randn(1, 4, 3, 4, 6))
    finally:
        handle.remove()
    assert out.shape == (1, 3, 9, 32, 48)
    assert seen == [1] * 9  # 1 + 4 + 4 frames, each alone (not in chunks of 4)


@torch.no_grad()
def test_decoder_convs_get_channels_last_inputs(vae):
    if not fastpaths.decision("channels_last_conv", torch.float32)[0]:
        pytest.skip("channels-last oneDNN convolutions do not run on this CPU")
    bad, handles = [], []
    for name, m in vae.decoder.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            def check(m, args, name=name):
                fmt = torch.channels_last if args[0].ndim == 4 else torch.channels_last_3d
                if not args[0].is_contiguous(memory_format=fmt):
                    bad.append(name)
            handles.append(m.register_forward_pre_hook(check))
    try:
        with fastpaths.portable(False):  # whatever DIFFCORE_PORTABLE says
            vae.decode(torch.randn(1, 4, 3, 4, 6))
    finally:
        for h in handles:
            h.remove()
    assert not bad, sorted(set(bad))


@torch.no_grad()
def test_causal_conv_chunks_equal_one_pass_with_state_updated_in_place():
    torch.manual_seed(0)
    conv = CausalConv3d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 7, 5, 6)
    cache = Cache()
    chunks = [conv(x[:, :, :1], cache)]
    state = cache[conv].data_ptr()
    for t in range(1, 7, 2):
        chunks.append(conv(x[:, :, t : t + 2], cache))
        assert cache[conv].data_ptr() == state
    torch.testing.assert_close(torch.cat(chunks, dim=2), conv(x))
    torch.testing.assert_close(cache[conv], x[:, :, -2:])
