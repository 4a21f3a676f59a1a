"""Tiny FLUX checkpoints built with diffusers (the oracle), saved in Diffusers format."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_flux_pipeline(kontext: bool = False, guidance_embeds: bool = True, seed: int = 0):
    """A tiny perturbed FluxPipeline / FluxKontextPipeline (diffusers objects)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffcore.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(seed)
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        eos_token_id=clip_tok.eos_token_id, bos_token_id=clip_tok.bos_token_id,
                                        pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                                 is_encoder_decoder=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.6, shift_factor=0.1,
                        use_quant_conv=False, use_post_quant_conv=False)
    for i, m in enumerate((clip, t5, transformer, vae)):
        perturb_(m, seed=seed + i)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    return cls(scheduler=scheduler, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
               transformer=transformer, vae=vae)


@pytest.fixture(scope="session")
def flux_folders(tmp_path_factory):
    """{variant: folder} for dev, schnell and kontext tiny checkpoints."""
    root = tmp_path_factory.mktemp("flux")
    out = {}
    for name, kw in {"dev": {}, "schnell": {"guidance_embeds": False}, "kontext": {"kontext": True}}.items():
        folder = root / name
        build_flux_pipeline(**kw).save_pretrained(folder)
        out[name] = folder
    return out
