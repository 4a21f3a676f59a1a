"""The DiT itself: Diffusers-style parameter names, shapes, and that every input matters."""
from __future__ import annotations

import pytest
import torch

from diffcore_ltx.transformer import LTX2Transformer2DModel


@pytest.fixture
def model(tiny_transformer_config):
    from diffcore.testing.weights import perturb_

    model = LTX2Transformer2DModel.from_config(tiny_transformer_config)
    return perturb_(model, seed=0).eval()


def _inputs(batch=2, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, h, w, generator=g), timestep=torch.tensor([0.3, 0.7][:batch]),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g))


def test_parameter_names(model):
    names = set(model.state_dict())
    for name in ["pos_embed.proj.weight", "time_text_embed.timestep_embedder.linear_1.weight",
                 "time_text_embed.text_embedder.linear_2.bias", "context_embedder.weight",
                 "transformer_blocks.0.norm1.linear.weight", "transformer_blocks.0.attn1.to_q.weight",
                 "transformer_blocks.0.attn1.norm_k.weight", "transformer_blocks.1.attn2.to_out.0.weight",
                 "transformer_blocks.1.norm2.weight", "transformer_blocks.1.ff.net.0.proj.weight",
                 "transformer_blocks.1.ff.net.2.weight", "norm_out.linear.weight", "proj_out.bias"]:
        assert name in names, name


@torch.no_grad()
def test_forward_shape_and_every_input_matters(model):
    x = _inputs()
    out = model(**x)
    assert out.shape == x["hidden_states"].shape and torch.isfinite(out).all()
    for key in ("timestep", "encoder_hidden_states", "pooled_projections"):
        changed = dict(x, **{key: x[key] + 0.5})
        assert not torch.allclose(model(**changed), out, atol=1e-6), f"{key} has no effect"


@torch.no_grad()
def test_attention_mixes_tokens(model):
    """Changing one latent patch changes the prediction elsewhere (tokens talk to each other)."""
    x = _inputs(batch=1)
    out = model(**x)
    hs = x["hidden_states"].clone()
    hs[..., :2, :2] += 1.0
    far = model(**dict(x, hidden_states=hs))[..., 4:, 6:]
    assert not torch.allclose(far, out[..., 4:, 6:], atol=1e-6)


@torch.no_grad()
def test_batch_items_are_independent(model):
    x = _inputs(batch=2)
    out = model(**x)
    one = model(**{k: v[:1] for k, v in x.items()})
    torch.testing.assert_close(out[:1], one, atol=1e-5, rtol=1e-5)


def test_fresh_model_starts_from_zero_output(tiny_transformer_config):
    """adaLN-Zero: an untrained model predicts exactly zero, the standard DiT initialisation."""
    fresh = LTX2Transformer2DModel.from_config(tiny_transformer_config)
    with torch.no_grad():
        assert fresh(**_inputs()).abs().max() == 0
