{%- set pipelines = cookiecutter.pipeline_class_names.split(',') | map('trim') | list -%}
"""Tiny {{ cookiecutter.family }} checkpoints for tests: random, perturbed weights in Diffusers format, offline.

In the package (not only in ``tests/``) so that other test suites can build one too: diffcore's engine tests
(threads, batching, sequence / CFG parallel under torchrun, serving) take every family's tiny checkpoint.
Runtime code never imports this module.
"""
from __future__ import annotations

PIPELINE = "{{ pipelines[0] }}"
# Small enough to run in well under a second; width 32 matches the tiny CLIP text encoder.
TINY_TRANSFORMER = dict(patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                        joint_attention_dim=32, pooled_projection_dim=32)


def write_tiny_checkpoint(folder, pipeline: str = PIPELINE, seed: int = 0):
    """Random, perturbed weights (norm scales and biases off their init values, so every weight matters)."""
    from diffcore.testing.checkpoints import flow_match_scheduler, tiny_autoencoder_kl, tiny_clip, write_checkpoint
    from diffcore.testing.weights import perturb_

    from .transformer import {{ cookiecutter.class_prefix }}Transformer2DModel

    tokenizer, text_encoder = tiny_clip(seed=seed)
    transformer = {{ cookiecutter.class_prefix }}Transformer2DModel.from_config(TINY_TRANSFORMER)
    return write_checkpoint(folder, pipeline, {
        "transformer": perturb_(transformer, seed=seed + 1),
        "vae": tiny_autoencoder_kl(latent_channels=4, seed=seed + 2),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": flow_match_scheduler(shift=3.0),
    })
