"""ZImageTransformer2DModel: diffusers' parameter names and numerics (the oracle), rows independent, limits."""
from __future__ import annotations

import pytest
import torch

from diffcore.errors import SamplingParamError
from diffcore_zimage.testing import TINY_TRANSFORMER, tiny_transformer


@pytest.fixture(scope="module")
def pair():
    """(ours, diffusers') with the same perturbed weights."""
    from diffusers import ZImageTransformer2DModel as Reference

    ours = tiny_transformer(seed=3)
    ref = Reference(**TINY_TRANSFORMER).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # every name equal, nothing missing or extra
    return ours, ref


def _inputs(cap_lens, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(cap_lens), 4, h, w, generator=g)
    caps = [torch.randn(n, TINY_TRANSFORMER["cap_feat_dim"], generator=g) for n in cap_lens]
    return latents, caps


@pytest.mark.parametrize("cap_lens,h,w", [([5], 8, 12), ([5, 40, 33], 8, 12), ([32, 7], 10, 6)])
@torch.no_grad()
def test_forward_equals_diffusers(pair, cap_lens, h, w):
    """Rows with captions of different lengths (padding to 32 within a row, masks across rows), odd grids."""
    ours, ref = pair
    latents, caps = _inputs(cap_lens, h, w)
    t = torch.linspace(0.2, 0.9, len(cap_lens))
    expected = torch.stack(ref(list(latents.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]).squeeze(2)
    embeds = torch.nn.utils.rnn.pad_sequence(caps, batch_first=True)
    got = ours(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
               layout=ours.layout(cap_lens, (h // 2, w // 2)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rows_are_independent_and_a_subset_layout_matches(pair):
    ours, _ = pair
    latents, caps = _inputs([5, 40, 33])
    embeds = torch.nn.utils.rnn.pad_sequence(caps, batch_first=True)
    layout = ours.layout([5, 40, 33], (4, 6))
    t = torch.full((3,), 0.4)
    out = ours(hidden_states=latents, timestep=t, encoder_hidden_states=embeds, layout=layout)
    sub = layout.rows([2, 0])
    assert sub.cap_lens == (33, 5)
    part = ours(hidden_states=latents[[2, 0]], timestep=t[:2], encoder_hidden_states=embeds[[2, 0], :33], layout=sub)
    torch.testing.assert_close(part, out[[2, 0]], atol=1e-5, rtol=1e-5)


def test_pad_tokens_and_refiners_matter(pair):
    ours, _ = pair
    latents, caps = _inputs([5])
    layout = ours.layout([5], (4, 6))

    def run():
        with torch.no_grad():
            return ours(hidden_states=latents, timestep=torch.tensor([0.5]), encoder_hidden_states=caps[0][None],
                        layout=layout)

    before = run()
    for name in ("x_pad_token", "cap_pad_token", "context_refiner.0.ffn_norm2.weight",
                 "noise_refiner.0.adaLN_modulation.0.bias"):
        param = ours.get_parameter(name)
        saved = param.detach().clone()
        with torch.no_grad():
            param.add_(0.5)
        try:
            assert not torch.allclose(run(), before, atol=1e-6), f"{name} has no effect"
        finally:
            with torch.no_grad():
                param.copy_(saved)


def test_rope_positions_beyond_axes_lens_are_refused(pair):
    ours, _ = pair
    ours.layout([5], (64, 4))  # 64 rows of tokens: positions up to 63 fit axes_lens[1] = 64
    with pytest.raises(SamplingParamError, match="height"):
        ours.layout([5], (65, 4))
