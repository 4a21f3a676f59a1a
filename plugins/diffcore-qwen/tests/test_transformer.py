"""Parity of diffcore_qwen's QwenImageTransformer2DModel against diffusers (the numerics oracle)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from diffusers import QwenImageTransformer2DModel as RefModel  # noqa: E402

from diffcore_qwen.transformer import QwenImageTransformer2DModel  # noqa: E402

from diffcore.testing.weights import perturb_  # noqa: E402


TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
REAL = {"_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
        "num_layers": 60, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 768}


def _pair(**extra):
    torch.manual_seed(0)
    ref = RefModel(**TINY, **extra).eval()
    perturb_(ref, seed=1)
    ours = QwenImageTransformer2DModel.from_config({**TINY, **extra, "pooled_projection_dim": 768}).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref, ours


def _inputs(img_shapes, batch=2, n_txt=7, lens=(7, 4)):
    g = torch.Generator().manual_seed(2)
    n_img = sum(f * h * w for f, h, w in img_shapes)
    x = torch.randn(batch, n_img, TINY["in_channels"], generator=g)
    txt = torch.randn(batch, n_txt, TINY["joint_attention_dim"], generator=g)
    mask = (torch.arange(n_txt)[None] < torch.tensor(lens)[:, None]).long()
    t = torch.tensor([0.93, 0.27])[:batch]
    return x, txt, mask, t, [list(img_shapes)] * batch


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    return cos, (a - b).abs().max().item()


CASES = {
    "t2i_nonsquare": ({}, [(1, 3, 5)], {}),
    "edit_two_images": ({}, [(1, 4, 6), (1, 3, 3)], {}),
    "edit2511_zero_cond_t": ({"zero_cond_t": True}, [(1, 4, 6), (1, 5, 2)], {}),
    "layered": ({"use_additional_t_cond": True, "use_layer3d_rope": True}, [(1, 2, 4), (1, 2, 4), (1, 3, 3)],
                {"additional_t_cond": torch.tensor([0, 1])}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(case):
    extra, shapes, kw = CASES[case]
    ref, ours = _pair(**extra)
    x, txt, mask, t, img_shapes = _inputs(shapes)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
                   img_shapes=img_shapes, return_dict=False, **kw)[0]
        got = ours(x, txt, mask, t, img_shapes=img_shapes, **kw)
        rope = ours.rope(img_shapes, txt.shape[1])
        got_pre = ours(x, txt, mask, t, img_shapes=img_shapes, rotary_emb=rope, **kw)
    cos, diff = _compare(got, want)
    print(f"{case}: cosine={cos:.8f} max|diff|={diff:.2e}")
    assert got.shape == want.shape
    assert cos >= 0.99999 and diff <= 1e-4, (cos, diff)
    assert torch.equal(got, got_pre)


def test_bfloat16_tracks_fp32(fastpath_mode):
    """bf16 weights + inputs stay close to the fp32 diffusers result, with the CPU fast paths and with the
    portable ones (what an AVX2-only CPU runs)."""
    ref, ours = _pair()
    x, txt, mask, t, img_shapes = _inputs([(1, 3, 5)])
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
                   img_shapes=img_shapes, return_dict=False)[0]
        ours.bfloat16()
        got = ours(x.bfloat16(), txt.bfloat16(), mask, t, img_shapes=img_shapes)
    assert got.dtype == torch.bfloat16
    cos, diff = _compare(got.float(), want)
    print(f"qwen transformer bf16 ({fastpath_mode}) vs diffusers fp32: cosine={cos:.7f} max|diff|={diff:.2e}")
    assert cos >= 0.999


@pytest.mark.parametrize("case", ["t2i_nonsquare", "edit2511_zero_cond_t"])
def test_single_sample_parity_with_diffusers(case):
    """Batch 1 takes the fused path (AdaLN scale/shift as the layer_norm's affine)."""
    extra, shapes, _ = CASES[case]
    ref, ours = _pair(**extra)
    x, txt, _, t, img_shapes = _inputs(shapes, batch=1)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_shapes=img_shapes, return_dict=False)[0]
        got = ours(x, txt, None, t, img_shapes=img_shapes)
    cos, diff = _compare(got, want)
    assert cos >= 0.99999 and diff <= 1e-4, (cos, diff)


def test_block_cache_protocol_composes_to_forward():
    """forward == tail(blocks(embed)) bit for bit, also with the blocks run in two pieces (as FBCache does)."""
    _, ours = _pair(zero_cond_t=True)
    x, txt, mask, t, img_shapes = _inputs([(1, 4, 6), (1, 5, 2)])
    kw = dict(encoder_hidden_states_mask=mask, timestep=t, img_shapes=img_shapes)
    with torch.no_grad():
        want = ours(x, txt, **kw)
        state = ours.cache_blocks(ours.cache_embed(x, txt, **kw), 0, 1)
        assert state.extra["txt"] is not None
        state = ours.cache_blocks(state, 1, ours.cache_num_blocks)
        assert state.extra["txt"] is None  # the last block skips the text stream the model discards
        got = ours.cache_tail(state)
        probe = ours.cache_probe(ours.cache_embed(x, txt, **kw))
    assert ours.cache_num_blocks == TINY["num_layers"]
    assert torch.equal(got, want)
    assert probe.shape == (2, x.shape[1], ours.inner_dim) and torch.isfinite(probe).all()


def test_rope_tables_match_diffusers_complex_freqs():
    ref, ours = _pair(use_layer3d_rope=False)
    shapes = [[(1, 4, 6), (1, 3, 3)]]
    img_f, txt_f = ref.pos_embed(shapes, max_txt_seq_len=5, device=torch.device("cpu"))
    cos, sin = ours.rope(shapes, 5)
    want = torch.cat([txt_f, img_f])  # joint [text, image] order
    assert cos.dtype == torch.float32 and cos.shape == (5 + 24 + 9, 16)
    torch.testing.assert_close(cos[:, 0::2], want.real, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, 1::2], want.imag, atol=1e-6, rtol=0)


def test_no_mask_equals_all_ones_mask_and_padding_is_ignored():
    _, ours = _pair()
    x, txt, mask, t, img_shapes = _inputs([(1, 3, 5)], lens=(7, 7))
    with torch.no_grad():
        full = ours(x, txt, None, t, img_shapes=img_shapes)
        torch.testing.assert_close(ours(x, txt, mask, t, img_shapes=img_shapes), full, atol=1e-6, rtol=0)
        short = (torch.arange(7)[None] < torch.tensor([[7], [3]])).long()
        base = ours(x, txt, short, t, img_shapes=img_shapes)
        txt2 = txt.clone()
        txt2[1, 3:] = torch.randn(4, txt.shape[-1]) * 5
        moved = ours(x, txt2, short, t, img_shapes=img_shapes)
    assert (base[1] - full[1]).abs().max() > 1e-3  # the mask changes the result ...
    torch.testing.assert_close(moved, base, atol=1e-5, rtol=0)  # ... and masked tokens have no influence


def test_rejects_bad_inputs_and_unsupported_options():
    _, ours = _pair()
    x, txt, mask, t, _ = _inputs([(1, 3, 5)])
    with pytest.raises(ValueError, match="share img_shapes"):
        ours(x, txt, mask, t, img_shapes=[[(1, 3, 5)], [(1, 5, 3)]])
    with pytest.raises(ValueError, match="image tokens"):
        ours(x, txt, mask, t, img_shapes=[[(1, 3, 4)]] * 2)
    with pytest.raises(NotImplementedError, match="guidance_embeds"):
        QwenImageTransformer2DModel(**{**TINY, "guidance_embeds": True})


def test_real_config_parameter_shapes_match_diffusers_on_meta():
    with torch.device("meta"):
        ref = RefModel.from_config({k: v for k, v in REAL.items() if k != "pooled_projection_dim"})
    ours = QwenImageTransformer2DModel.from_config(REAL, device="meta")
    want = {(n, tuple(p.shape)) for n, p in ref.state_dict().items()}
    got = {(n, tuple(p.shape)) for n, p in ours.state_dict().items()}
    assert got == want
    assert len(got) == len(list(ours.state_dict())) and len(got) > 60 * 20
    assert ours.config["pooled_projection_dim"] == 768
    assert all(p.is_meta for p in ours.parameters())
