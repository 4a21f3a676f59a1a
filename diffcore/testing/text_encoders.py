"""Tiny random ``transformers`` encoders (and image processors) matching ``diffcore.testing.tokenizers``.

Each builder seeds torch's RNG inside ``fork_rng`` (the caller's RNG state is untouched), constructs
the model in float32 eval mode and, by default, ``perturb_``s it so that norm scales and biases are not
at their trivial init values (see ``diffcore.testing.weights``). Same arguments -> identical weights.
Vocabulary sizes and special-token ids are taken from the tokenizer passed in, so the pairs stay
consistent (e.g. CLIP's pooled output is read at ``eos_token_id``).

Image processors are built from transformers' PIL backends, which need no torchvision. They save
``preprocessor_config.json`` with the real class names (``CLIPImageProcessor``,
``Qwen2VLImageProcessor``); note however that a diffusers ``model_index.json`` records the Python class
name, i.e. ``CLIPImageProcessorPil`` / ``Qwen2VLImageProcessorPil``, when torchvision is absent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .weights import perturb_

__all__ = [
    "tiny_clip_text_model",
    "tiny_t5_encoder",
    "tiny_umt5_encoder",
    "tiny_clip_vision_model",
    "tiny_clip_image_processor",
    "tiny_qwen25vl",
    "tiny_qwen2vl_image_processor",
]


def _build(factory: Callable[[], torch.nn.Module], seed: int, perturb: bool) -> torch.nn.Module:
    """Construct under a private, seeded global RNG; optionally perturb with the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    model = model.to(torch.float32).eval()
    if perturb:
        perturb_(model, seed=seed)
    return model


def tiny_clip_text_model(
    tokenizer,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    projection_dim: int = 32,
    seed: int = 0,
    perturb: bool = True,
) -> CLIPTextModel:
    """``CLIPTextModel`` (FLUX's pooled-text encoder) sized to ``tokenizer``; ``max_position_embeddings``
    equals ``tokenizer.model_max_length`` (77) and bos/eos/pad ids come from the tokenizer."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _build(lambda: CLIPTextModel(config), seed, perturb)


def _t5_config(cls, tokenizer, d_model: int, layers: int, heads: int, d_kv: int | None):
    return cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv or d_model // heads,
        d_ff=d_model * 2,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / UMT5 as used by FLUX and Wan
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def tiny_t5_encoder(
    tokenizer, d_model: int = 32, layers: int = 2, heads: int = 2, d_kv: int | None = None, seed: int = 0,
    perturb: bool = True,
) -> T5EncoderModel:
    """``T5EncoderModel`` (FLUX's sequence encoder, gated-gelu T5 v1.1) sized to ``tokenizer``."""
    config = _t5_config(T5Config, tokenizer, d_model, layers, heads, d_kv)
    return _build(lambda: T5EncoderModel(config), seed, perturb)


def tiny_umt5_encoder(
    tokenizer, d_model: int = 32, layers: int = 2, heads: int = 2, d_kv: int | None = None, seed: int = 0,
    perturb: bool = True,
) -> UMT5EncoderModel:
    """``UMT5EncoderModel`` (Wan's text encoder: per-layer relative position bias) sized to ``tokenizer``."""
    config = _t5_config(UMT5Config, tokenizer, d_model, layers, heads, d_kv)
    return _build(lambda: UMT5EncoderModel(config), seed, perturb)


def tiny_clip_vision_model(
    hidden: int = 32,
    image_size: int = 32,
    patch: int = 8,
    layers: int = 2,
    heads: int = 2,
    projection_dim: int = 32,
    seed: int = 0,
    perturb: bool = True,
) -> CLIPVisionModel:
    """``CLIPVisionModel`` (Wan 2.1 I2V image encoder); pair with ``tiny_clip_image_processor(image_size)``."""
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu",
    )
    return _build(lambda: CLIPVisionModel(config), seed, perturb)


def tiny_clip_image_processor(size: int = 32) -> CLIPImageProcessorPil:
    """CLIP preprocessing (bicubic resize of the short side, centre crop, CLIP mean/std) at ``size``.

    The PIL backend (works without torchvision); its ``preprocessor_config.json`` says
    ``CLIPImageProcessor`` like real checkpoints.
    """
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_qwen25vl(
    tokenizer,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    seed: int = 0,
    perturb: bool = True,
) -> Qwen2_5_VLForConditionalGeneration:
    """``Qwen2_5_VLForConditionalGeneration`` (Qwen-Image's text encoder) with a tiny vision tower.

    Image/video/vision-start/end ids and bos/eos/pad come from ``tokenizer`` (see
    ``tiny_qwen2_tokenizer``). The vision tower keeps the real geometry (patch 14, temporal patch 2,
    2x2 spatial merge, window size 112 with the last block full attention), so it consumes the output
    of ``tiny_qwen2vl_image_processor`` unchanged. Text uses GQA (``kv_heads``) and M-RoPE with
    sections scaled to the tiny head dim (they must sum to head_dim / 2).
    """
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # real: [16, 24, 24] of 64
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_heads=vision_heads,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
            out_hidden_size=hidden,
            tokens_per_second=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return _build(lambda: Qwen2_5_VLForConditionalGeneration(config), seed, perturb)


def tiny_qwen2vl_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image preprocessing with the real patch 14 / temporal 2 / merge 2 semantics but a small
    pixel budget (default at most 112x112 -> 8x8 patches -> 16 language tokens per image).

    PIL backend (no torchvision needed); saves as ``Qwen2VLImageProcessor``.
    """
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
