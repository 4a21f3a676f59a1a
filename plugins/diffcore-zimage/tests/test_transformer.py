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


@torch.no_grad()
def test_caption_stream_is_computed_once_per_request_and_again_when_weights_change(pair):
    """The context refiner runs at the first step only (same caption tensor, same layout); later steps equal a
    fresh layout's output bit for bit; a weight changed in place or replaced makes it run again."""
    ours, _ = pair
    latents, caps = _inputs([5, 40])
    embeds = torch.nn.utils.rnn.pad_sequence(caps, batch_first=True)
    layout = ours.layout([5, 40], (4, 6))
    calls = []
    handle = ours.context_refiner[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        def step(t, lay=layout, e=embeds):
            return ours(hidden_states=latents, timestep=torch.full((2,), t), encoder_hidden_states=e, layout=lay)

        first, second = step(0.3), step(0.6)
        assert len(calls) == 1
        torch.testing.assert_close(second, step(0.6, lay=ours.layout([5, 40], (4, 6))), atol=0, rtol=0)
        assert len(calls) == 2  # a new layout (a new request) computes its own
        step(0.9)
        assert len(calls) == 2  # the first layout still holds its own
        step(0.6, e=embeds.clone())
        step(0.6), step(0.6)
        assert len(calls) == 4  # another caption tensor, then the first one again (and kept)
        weight = ours.get_parameter("context_refiner.0.feed_forward.w2.weight")
        saved = weight.detach().clone()
        try:
            weight.add_(0.5)  # in place: the same object, a new version
            changed = step(0.6)
            assert len(calls) == 5 and not torch.allclose(changed, second, atol=1e-6)
        finally:
            weight.copy_(saved)
        torch.testing.assert_close(step(0.6), second, atol=0, rtol=0)
        assert len(calls) == 6
    finally:
        handle.remove()


@torch.no_grad()
def test_last_layer_runs_its_mlp_on_the_image_rows_only(pair):
    """cache_tail reads the image rows, so the last layer's MLP skips the caption rows (the others do not)."""
    ours, _ = pair
    latents, caps = _inputs([5, 40])
    rows = {}
    hooks = [ours.layers[i].feed_forward.register_forward_hook(lambda m, a, o, i=i: rows.update({i: a[0].shape[1]}))
             for i in (0, len(ours.layers) - 1)]
    try:
        ours(hidden_states=latents, timestep=torch.full((2,), 0.5),
             encoder_hidden_states=torch.nn.utils.rnn.pad_sequence(caps, batch_first=True),
             layout=ours.layout([5, 40], (4, 6)))
    finally:
        for h in hooks:
            h.remove()
    assert rows == {0: 32 + 64, len(ours.layers) - 1: 4 * 6}  # 24 image tokens padded to 32, captions to 64


def test_bfloat16_tracks_fp32(pair, fastpath_mode):
    """bf16 weights and inputs stay close to diffusers' fp32 result at two steps of one request (the second reuses
    the caption stream), with the CPU fast paths and with the portable ones (what an AVX2-only CPU runs)."""
    _, ref = pair
    ours = tiny_transformer(seed=3).bfloat16()
    cap_lens, (h, w) = [5, 40], (8, 12)
    latents, caps = _inputs(cap_lens, h, w)
    embeds = torch.nn.utils.rnn.pad_sequence(caps, batch_first=True).bfloat16()
    layout = ours.layout(cap_lens, (h // 2, w // 2))
    for t in (0.3, 0.7):
        times = torch.full((2,), t)
        with torch.no_grad():
            expected = torch.stack(ref(list(latents.unsqueeze(2).unbind(0)), times, caps, return_dict=False)[0]).squeeze(2)
        with torch.inference_mode():
            got = ours(hidden_states=latents.bfloat16(), timestep=times, encoder_hidden_states=embeds, layout=layout)
        assert got.dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), expected.flatten(), dim=0)
        print(f"zimage transformer bf16 ({fastpath_mode}, t={t}) vs diffusers fp32: cosine={float(cos):.6f}")
        assert cos >= 0.999, (fastpath_mode, t, float(cos))
    assert "captions" in layout.memo
