"""Tiny Z-Image checkpoints for tests (offline, perturbed random weights), built from diffcore's own modules.

The folder uses diffusers' names and configs, so diffusers' ZImagePipeline loads it too (the parity tests'
oracle). Runtime code never imports this module.
"""
from __future__ import annotations

from pathlib import Path

# Qwen3's chat template, reduced to what Z-Image uses: user turns, the generation prompt, and the empty think
# block that ``enable_thinking=False`` adds (diffusers passes True: no block).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
TINY_TRANSFORMER = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=32, n_layers=2,
                        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                        axes_lens=[256, 64, 64], rope_theta=256.0, t_scale=1000.0)
VAE_BLOCKS = (8, 16, 16, 16)  # 8x down, as the real FLUX.1 VAE: sizes are multiples of 16


def tiny_qwen3_tokenizer():
    """diffcore's tiny Qwen2 tokenizer (Qwen's special tokens) with a Qwen3 chat template."""
    from diffcore.testing.tokenizers import tiny_qwen2_tokenizer

    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3(tokenizer, hidden: int = 16, layers: int = 3, seed: int = 0, heads: int = 2, kv_heads: int = 1,
               head_dim: int = 8):
    """A perturbed ``Qwen3Model`` (no LM head, as Z-Image's text_encoder) that fits ``tokenizer``."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from diffcore.testing.weights import perturb_

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3Model(config)
    return perturb_(model, seed=seed).eval()


def tiny_transformer(seed: int = 1, **overrides):
    """Our ZImageTransformer2DModel (diffusers' names), perturbed so every weight (pad tokens too) matters."""
    import torch

    from diffcore.testing.weights import perturb_

    from .transformer import ZImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ZImageTransformer2DModel.from_config({**TINY_TRANSFORMER, **overrides})
    return perturb_(model, seed=seed).eval()


def write_tiny_zimage(folder, pipeline: str = "ZImagePipeline", seed: int = 0, shift: float = 3.0) -> Path:
    """A tiny Z-Image checkpoint folder (Turbo and base differ only by weights and defaults)."""
    from diffcore.testing.checkpoints import flow_match_scheduler, tiny_autoencoder_kl, write_checkpoint

    tokenizer = tiny_qwen3_tokenizer()
    return write_checkpoint(folder, pipeline, {
        "transformer": tiny_transformer(seed + 1),
        "vae": tiny_autoencoder_kl(latent_channels=4, block_out_channels=VAE_BLOCKS, seed=seed + 2,
                                   scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": tiny_qwen3(tokenizer, seed=seed + 3),
        "tokenizer": tokenizer,
        "scheduler": flow_match_scheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False),
    })
