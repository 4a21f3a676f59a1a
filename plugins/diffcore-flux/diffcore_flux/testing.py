"""Tiny FLUX checkpoints for tests (offline, perturbed random weights), built from diffcore's own modules: the
FLUX fixtures of the core's tests live here, so diffcore.testing knows no family. Runtime code never imports
this module."""
from __future__ import annotations

from pathlib import Path


def write_tiny_flux(folder: str | Path, pipeline: str = "FluxPipeline", layers: tuple[int, int] = (1, 1),
                    vae_blocks: tuple[int, ...] = (8, 16), dynamic_shift: bool = True, vae_seed: int = 2) -> Path:
    """A tiny FLUX.1-dev checkpoint (the core tests' one FLUX model), written with diffcore's own modules (no
    diffusers): ``layers`` = (double, single) blocks, perturbed weights."""
    import torch

    from .transformer import FluxTransformer2DModel

    from diffcore.testing.checkpoints import flow_match_scheduler, tiny_autoencoder_kl, tiny_clip, write_checkpoint
    from diffcore.testing.text_encoders import tiny_t5_encoder
    from diffcore.testing.tokenizers import tiny_t5_tokenizer
    from diffcore.testing.weights import perturb_

    clip_tok, clip = tiny_clip()
    t5_tok = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel.from_config(dict(
            in_channels=16, num_layers=layers[0], num_single_layers=layers[1], attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6)))
    scheduler = flow_match_scheduler(shift=3.0, use_dynamic_shifting=True) if dynamic_shift else \
        flow_match_scheduler(shift=3.0)
    return write_checkpoint(folder, pipeline, {
        "scheduler": scheduler, "text_encoder": clip, "tokenizer": clip_tok, "text_encoder_2": tiny_t5_encoder(t5_tok),
        "tokenizer_2": t5_tok, "transformer": perturb_(transformer, seed=1),
        "vae": tiny_autoencoder_kl(block_out_channels=vae_blocks, seed=vae_seed)})
