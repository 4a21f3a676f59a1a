"""FLUX.1 transformer: fp32 parity with diffusers on perturbed tiny weights, and real-config key/shape equality."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffcore_flux.transformer import FluxTransformer2DModel  # noqa: E402

import diffusers  # noqa: E402  (the test oracle)
DiffusersFlux = diffusers.FluxTransformer2DModel

from diffcore.testing.dtypes import DtypeRecorder  # noqa: E402
from diffcore.testing.weights import perturb_  # noqa: E402


TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)

DEV = dict(
    attention_head_dim=128,
    guidance_embeds=True,
    in_channels=64,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=19,
    num_single_layers=38,
    patch_size=1,
    pooled_projection_dim=768,
    axes_dims_rope=[16, 56, 56],
)


def _inputs(seed: int = 0, batch: int = 2, h: int = 3, w: int = 5, n_txt: int = 7):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 0] = 1.0  # non-zero first axis (as in Kontext) so every axis is exercised
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(batch, h * w, TINY["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, TINY["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.25, 0.9])[:batch],
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.randint(0, 9, (n_txt, 3), generator=g).float(),
    )


def _pair(guidance_embeds: bool, seed: int = 0):
    torch.manual_seed(seed)
    ref = DiffusersFlux(**TINY, guidance_embeds=guidance_embeds).eval()
    perturb_(ref, seed)
    ours = FluxTransformer2DModel.from_config({**TINY, "guidance_embeds": guidance_embeds}).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
    return cos, (a - b).abs().max().item()


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev-like", "schnell-like"])
def test_parity_with_diffusers(guidance_embeds, fastpath_mode):
    ref, ours = _pair(guidance_embeds)
    inp = _inputs()
    guidance = torch.tensor([3.5, 2.0]) if guidance_embeds else None
    with torch.no_grad():
        expected = ref(**inp, guidance=guidance, return_dict=False)[0]
        got = ours(**inp, guidance=guidance)
        rope = ours.rope(inp["img_ids"], inp["txt_ids"])
        got_precomputed = ours(**{k: v for k, v in inp.items() if not k.endswith("_ids")}, guidance=guidance, rotary_emb=rope)
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape == (2, 15, TINY["in_channels"])
    cos, err = _compare(got, expected)
    print(f"flux transformer parity (guidance_embeds={guidance_embeds}): cosine={cos:.9f} max|diff|={err:.3e}")
    assert cos >= 0.99999 and err <= 1e-4
    assert torch.equal(got, got_precomputed)
    # the output must actually depend on the conditioning (guards against a dead temb / text path)
    with torch.no_grad():
        other = ours(**{**inp, "timestep": torch.tensor([0.5, 0.1])}, guidance=guidance)
    assert (other - got).abs().max() > 1e-3


def test_bfloat16_tracks_fp32(fastpath_mode):
    """bf16 weights + inputs stay close to the fp32 diffusers result, with the CPU fast paths and with the
    portable ones (what an AVX2-only CPU runs)."""
    ref, ours = _pair(True)
    inp = _inputs()
    guidance = torch.tensor([3.5, 2.0])
    with torch.no_grad():
        expected = ref(**inp, guidance=guidance, return_dict=False)[0]
        ours.bfloat16()
        got = ours(**{k: v if k == "timestep" else v.bfloat16() for k, v in inp.items()}, guidance=guidance)
    assert got.dtype == torch.bfloat16
    cos, err = _compare(got.float(), expected)
    print(f"flux transformer bf16 ({fastpath_mode}) vs diffusers fp32: cosine={cos:.7f} max|diff|={err:.3e}")
    assert cos >= 0.999


def test_last_block_computes_image_rows_only():
    """The last single block skips the text rows' outputs; the result equals computing every row."""
    _, ours = _pair(True)
    inp = {**_inputs(), "guidance": torch.tensor([3.5, 2.0])}
    n, n_txt = ours.cache_num_blocks, inp["encoder_hidden_states"].shape[1]
    with torch.no_grad():
        got = ours(**inp)
        state = ours.cache_blocks(ours.cache_embed(**inp), 0, n - 1)
        h = torch.cat([state.extra["ctx"], state.hidden], 1)
        state.hidden = ours.single_transformer_blocks[-1](h, state.extra["temb_act"], state.extra["rope"])[:, n_txt:]
        all_rows = ours.cache_tail(state)
        split = ours.cache_blocks(ours.cache_blocks(ours.cache_embed(**inp), 0, 1), 1, n)  # FBCache's path
        tail = ours.cache_tail(split)  # under no_grad like `got` (with autograd on, Linear takes F.linear)
    torch.testing.assert_close(got, all_rows, rtol=1e-6, atol=1e-6)
    assert split.extra["ctx"] is None and torch.equal(tail, got)


def test_rope_matches_diffusers_pos_embed():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    inp = _inputs()
    ours = FluxTransformer2DModel.from_config({**TINY, "num_layers": 0, "num_single_layers": 0})
    cos, sin = ours.rope(inp["img_ids"], inp["txt_ids"])
    ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=list(TINY["axes_dims_rope"]))(
        torch.cat([inp["txt_ids"], inp["img_ids"]])
    )
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (7 + 15, 16)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    # a batched (deprecated 3-D) ids tensor gives the same tables
    cos3, _ = ours.rope(inp["img_ids"][None], inp["txt_ids"][None])
    assert torch.equal(cos3, cos)


def test_scalar_timestep_and_missing_guidance():
    _, ours = _pair(True)
    inp = _inputs()
    with torch.no_grad():
        batched = ours(**{**inp, "timestep": torch.tensor([0.4, 0.4])}, guidance=torch.tensor([3.5, 3.5]))
        scalar = ours(**{**inp, "timestep": torch.tensor(0.4)}, guidance=torch.tensor(3.5))
        assert torch.equal(batched, scalar)
        with pytest.raises(ValueError, match="guidance"):
            ours(**inp)


def test_step_path_has_no_float64():
    _, ours = _pair(True)
    inp = _inputs()
    rope = ours.rope(inp["img_ids"], inp["txt_ids"])
    step_inputs = {k: v for k, v in inp.items() if not k.endswith("_ids")}
    recorder = DtypeRecorder()
    with torch.no_grad(), recorder:
        ours(**step_inputs, guidance=torch.tensor([3.5, 3.5]), rotary_emb=rope)
    assert torch.float32 in recorder.dtypes and torch.float64 not in recorder.dtypes


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["FLUX.1-dev", "FLUX.1-schnell"])
def test_real_config_state_dict_matches_diffusers(guidance_embeds):
    cfg = {**DEV, "guidance_embeds": guidance_embeds, "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0"}
    ours = FluxTransformer2DModel.from_config(cfg, device="meta")
    with torch.device("meta"):
        ref = DiffusersFlux(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    ours_keys = {(k, tuple(v.shape)) for k, v in ours.state_dict().items()}
    ref_keys = {(k, tuple(v.shape)) for k, v in ref.state_dict().items()}
    assert ours_keys == ref_keys
    assert any(k.startswith("time_text_embed.guidance_embedder") for k, _ in ours_keys) == guidance_embeds
    assert sum(v.numel() for v in ours.state_dict().values()) > 11_000_000_000
