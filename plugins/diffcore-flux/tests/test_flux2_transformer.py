"""FLUX.2 transformer: fp32 parity with diffusers (plain, with references, KV extract/cached), the real
configs' keys and shapes, the BFL single-file layout, and the block-cache protocol."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402  (the test oracle)
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402

from diffcore.testing.key_layouts import assert_converts_like  # noqa: E402
from diffcore.testing.weights import assert_parity, perturb_  # noqa: E402
from diffcore_flux.flux2_configs import position_ids  # noqa: E402
from diffcore_flux.flux2_key_layouts import LAYOUTS  # noqa: E402
from diffcore_flux.flux2_transformer import Flux2Transformer2DModel, RefKV  # noqa: E402

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
REAL = {  # diffusers' converter geometry (models-2026.md 1.3)
    "dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360, guidance_embeds=True),
    "klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                     guidance_embeds=False),
}


def _pair(guidance_embeds: bool, seed: int = 0):
    theirs = diffusers.Flux2Transformer2DModel(**TINY, guidance_embeds=guidance_embeds)
    perturb_(theirs, seed=seed)
    ours = Flux2Transformer2DModel(**TINY, guidance_embeds=guidance_embeds)
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


def _ids(grids, n_txt):
    txt = torch.zeros(n_txt, 4)
    txt[:, 3] = torch.arange(n_txt)
    img = torch.cat([position_ids(h, w, t) for t, (h, w) in grids])
    return img, txt


def _inputs(grids, n_txt=5, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for _, (h, w) in grids)
    img_ids, txt_ids = _ids(grids, n_txt)
    return dict(hidden_states=torch.randn(batch, n, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, n_txt, 24, generator=g),
                timestep=torch.tensor([0.3, 0.8])[:batch], img_ids=img_ids, txt_ids=txt_ids)


@pytest.mark.parametrize("guidance_embeds,grids", [
    (True, [(0, (3, 4))]),
    (False, [(0, (2, 3)), (10, (3, 3)), (20, (2, 2))]),
])
def test_forward_parity(guidance_embeds, grids):
    ours, theirs = _pair(guidance_embeds)
    x = _inputs(grids)
    guidance = torch.tensor([3.5, 2.0]) if guidance_embeds else None
    with torch.no_grad():
        want = theirs(**x, guidance=guidance, return_dict=False)[0]
        got = ours(**x, guidance=guidance)
        got_rope = ours(**{k: v for k, v in x.items() if not k.endswith("ids")}, guidance=guidance,
                        rotary_emb=ours.rope(x["img_ids"], x["txt_ids"]))
    assert_parity(got, want, max_diff=1e-4)
    assert torch.equal(got, got_rope)


def test_kv_extract_then_cached_equal_diffusers():
    """klein-KV: the first call runs [refs, target] block-causally and keeps the refs' K/V; later calls reuse them."""
    ours, theirs = _pair(False, seed=3)
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    for block in theirs.transformer_blocks:  # what Flux2KleinKVPipeline does
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in theirs.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    target, refs = [(0, (2, 3))], [(10, (3, 2)), (20, (2, 2))]
    n_ref = 6 + 4
    x = _inputs(refs + target, seed=1)  # diffusers' extract layout: references first
    ref_tokens, latents = x["hidden_states"][:, :n_ref], x["hidden_states"][:, n_ref:]
    with torch.no_grad():
        want0, cache = theirs(**x, guidance=None, return_dict=False, kv_cache_mode="extract", num_ref_tokens=n_ref)
        tgt_ids, txt_ids = _ids(target, 5)
        want1 = theirs(hidden_states=latents * 0.5, encoder_hidden_states=x["encoder_hidden_states"],
                       timestep=torch.tensor([0.1, 0.2]), img_ids=tgt_ids, txt_ids=txt_ids, kv_cache=cache,
                       kv_cache_mode="cached", return_dict=False)[0]
        kv = RefKV(ref_tokens, ours.rope(x["img_ids"], x["txt_ids"]))
        common = dict(encoder_hidden_states=x["encoder_hidden_states"], rotary_emb=ours.rope(tgt_ids, txt_ids), ref_kv=kv)
        got0 = ours(hidden_states=latents, timestep=x["timestep"], **common)
        assert kv.filled and len(kv.double) == 2 and len(kv.single) == 2
        got1 = ours(hidden_states=latents * 0.5, timestep=torch.tensor([0.1, 0.2]), **common)
    assert_parity(got0, want0, max_diff=1e-4)
    assert_parity(got1, want1, max_diff=1e-4)


def test_block_cache_protocol_equals_forward():
    ours, _ = _pair(True)
    x = _inputs([(0, (3, 3)), (10, (2, 2))])
    g = torch.tensor([4.0, 4.0])
    with torch.no_grad():
        state = ours.cache_embed(x["hidden_states"], x["encoder_hidden_states"], x["timestep"], x["img_ids"],
                                 x["txt_ids"], g)
        for a, b in ((0, 1), (1, 3), (3, ours.cache_num_blocks)):
            state = ours.cache_blocks(state, a, b)
        assert torch.equal(ours.cache_tail(state), ours(**x, guidance=g))


@pytest.mark.parametrize("variant", sorted(REAL))
def test_real_config_keys_and_shapes(variant):
    cfg = dict(REAL[variant])
    with torch.device("meta"):
        theirs = diffusers.Flux2Transformer2DModel(**cfg)
        ours = Flux2Transformer2DModel(**cfg)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    name = {"dev": "FLUX.2 [dev]", "klein-4b": "FLUX.2 [klein] 4B"}[variant]
    # the variant named from the config and from the weights' shapes (BFL files of the variants share one layout)
    assert Flux2Transformer2DModel.variant_of_config(cfg).startswith(name + ", hidden")
    assert Flux2Transformer2DModel.variant_of_weights(want) == Flux2Transformer2DModel.variant_of_config(cfg)


def test_bfl_layout_converts_like_diffusers(flux2_to_bfl):
    """The BFL single-file names (flux2-dev.safetensors, GGUFs) map to what diffusers' converter produces."""
    theirs = diffusers.Flux2Transformer2DModel(**TINY, guidance_embeds=True)
    perturb_(theirs, seed=5)
    sd = theirs.state_dict()
    bfl = flux2_to_bfl(sd)
    reference = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(reference) == set(sd)
    assert_converts_like(bfl, reference, LAYOUTS, LAYOUTS[1])
