"""A tiny ltx checkpoint in Diffusers format, and a generator loaded from it.

Fixtures from diffcore's pytest plugin (installed with diffcore): ``isolated_plugin_manager``.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline

PIPELINE = "LTX2Pipeline"
# Small enough to run in well under a second; width 32 matches the tiny CLIP text encoder.
TINY_TRANSFORMER = dict(patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                        joint_attention_dim=32, pooled_projection_dim=32)


def write_tiny_checkpoint(folder, pipeline: str = PIPELINE, seed: int = 0):
    """Random, perturbed weights (norm scales and biases off their init values, so every weight matters)."""
    from diffcore.testing.checkpoints import flow_match_scheduler, tiny_autoencoder_kl, tiny_clip, write_checkpoint
    from diffcore.testing.weights import perturb_
    from diffcore_ltx.transformer import LTX2Transformer2DModel

    tokenizer, text_encoder = tiny_clip(seed=seed)
    transformer = LTX2Transformer2DModel.from_config(TINY_TRANSFORMER)
    return write_checkpoint(folder, pipeline, {
        "transformer": perturb_(transformer, seed=seed + 1),
        "vae": tiny_autoencoder_kl(latent_channels=4, seed=seed + 2),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": flow_match_scheduler(shift=3.0),
    })


@pytest.fixture
def tiny_transformer_config():
    return dict(TINY_TRANSFORMER)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ltx") / "model")


@pytest.fixture
def generator(isolated_plugin_manager, tiny_checkpoint):
    """The checkpoint loaded by diffcore's real loader, with only this plugin registered."""
    import diffcore_ltx.plugin
    from diffcore import DiffGenerator

    isolated_plugin_manager(diffcore_ltx.plugin)
    return DiffGenerator.from_pretrained(tiny_checkpoint, dtype="float32", progress=False)
