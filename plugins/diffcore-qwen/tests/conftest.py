"""Tiny Qwen-Image checkpoints built with diffusers (the oracle), saved in Diffusers format.

transformers 5.24 cannot build ``Qwen2VLProcessor`` without torchvision (its video processor needs it),
which the Edit pipelines list as ``processor``. ``tiny_vl_processor`` builds a real ``Qwen2VLProcessor``
instance without running its constructor (only the image processor and tokenizer are set; its
``__call__`` never touches the video processor), and gives it a ``save_pretrained`` that writes what a
real checkpoint's ``processor/`` folder holds for images: the tokenizer files and
``preprocessor_config.json``. model_index.json then records ``["transformers", "Qwen2VLProcessor"]`` as
in the real repos. The diffusers reference reloads every other component from the folder and is
handed this processor object.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    import diffcore_qwen  # noqa: F401
except ImportError:  # plugin not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The real Qwen-Image scheduler config (dynamic shift up to 8192 tokens, max shift 0.9, shift_terminal).
QWEN_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                      base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                      time_shift_type="exponential")
VARIANTS = ("t2i", "edit", "edit_plus")


def tiny_vl_processor(tokenizer, image_processor):
    """A ``Qwen2VLProcessor`` made of an image processor and a tokenizer only (see the module docstring)."""
    from transformers import Qwen2VLProcessor

    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.chat_template, proc.tokenizer, proc.image_processor = None, tokenizer, image_processor
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tokenizer.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tokenizer.convert_tokens_to_ids(proc.video_token)

    def save_pretrained(save_directory, **kwargs):
        tokenizer.save_pretrained(save_directory)
        image_processor.save_pretrained(save_directory)

    proc.save_pretrained = save_pretrained
    return proc


def build_qwen_pipeline(variant: str = "t2i", seed: int = 0):
    """A tiny perturbed diffusers QwenImagePipeline / QwenImageEditPipeline / QwenImageEditPlusPipeline.

    Sizes: Qwen2.5-VL 32 wide (2 layers, vision tower 2 blocks, images <= 448x448); MMDiT 2 blocks of
    2 heads x 16; 3D VAE with base_dim 4 and 16x spatial compression (the Edit pipelines encode their
    input at ~1 MP: a small VAE, and ~1k instead of ~4k condition tokens so the prompt still matters).
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageEditPlusPipeline, QwenImagePipeline, QwenImageTransformer2DModel)

    from diffcore.testing.text_encoders import tiny_qwen25vl, tiny_qwen2vl_image_processor
    from diffcore_qwen.testing import tiny_qwen_image_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_image_tokenizer()
    text_encoder = tiny_qwen25vl(tokenizer, hidden=32, seed=seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True, False],
                                 latents_mean=[0.1, -0.2, 0.3, -0.05], latents_std=[0.8, 1.3, 1.1, 0.7])
    perturb_(transformer, seed=seed + 1)
    perturb_(vae, seed=seed + 2)
    with torch.no_grad():  # sharper image->text attention, so a wrong prompt token moves an Edit output visibly
        for block in transformer.transformer_blocks:
            block.attn.norm_added_k.weight.mul_(4.0)
    transformer.eval(), vae.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if variant == "t2i":
        return QwenImagePipeline(**parts)
    # Up to 448x448 pixels: Edit's ~1 MP view is cut down to that, Edit-Plus' ~384x384 view is not.
    processor = tiny_vl_processor(tokenizer, tiny_qwen2vl_image_processor(max_pixels=448 * 448))
    cls = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    return cls(processor=processor, **parts)


def reference_pipeline(folder, variant: str, load: dict | None = None):
    """The diffusers pipeline reloaded from ``folder`` (fp32; ``load``: more from_pretrained arguments, e.g. a
    weights variant); the processor is rebuilt from its saved files."""
    load = load or {}
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
    from transformers import AutoImageProcessor, AutoTokenizer

    if variant == "t2i":
        return QwenImagePipeline.from_pretrained(folder, dtype=torch.float32, **load)
    proc_dir = str(Path(folder) / "processor")
    processor = tiny_vl_processor(AutoTokenizer.from_pretrained(proc_dir), AutoImageProcessor.from_pretrained(proc_dir))
    cls = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    return cls.from_pretrained(folder, processor=processor, dtype=torch.float32, **load)


@pytest.fixture(scope="session")
def qwen_folders(tmp_path_factory):
    """{variant: folder} for the tiny t2i / edit / edit_plus checkpoints."""
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for variant in VARIANTS:
        folder = root / variant
        build_qwen_pipeline(variant).save_pretrained(folder)
        out[variant] = folder
    return out


@pytest.fixture(scope="session")
def qwen_reference():
    """``reference(folder, variant)``: the diffusers oracle pipeline for a saved tiny checkpoint."""
    return reference_pipeline


@pytest.fixture(scope="session")
def make_vl_processor():
    """``make(tokenizer, image_processor)``: transformers' own Qwen2VLProcessor (the oracle for ours)."""
    return tiny_vl_processor


def build_qwen_layered(seed: int = 0):
    """A tiny perturbed diffusers QwenImageLayeredPipeline: RGBA VAE (4 image channels), layer-3D RoPE and the
    additional timestep condition in the transformer."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline,
                           QwenImageTransformer2DModel)

    from diffcore.testing.text_encoders import tiny_qwen25vl, tiny_qwen2vl_image_processor
    from diffcore_qwen.testing import tiny_qwen_image_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_image_tokenizer()
    text_encoder = tiny_qwen25vl(tokenizer, hidden=32, seed=seed)
    # z_dim 8, not 4: diffusers takes a 4-channel (RGBA) input for latents when z_dim is 4
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=32, out_channels=8, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6), use_additional_t_cond=True,
                                              use_layer3d_rope=True)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=8, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True, False], input_channels=4,
                                 latents_mean=[0.1, -0.2, 0.3, -0.05, 0.0, 0.2, -0.1, 0.05],
                                 latents_std=[0.8, 1.3, 1.1, 0.7, 1.0, 0.9, 1.2, 0.6])
    perturb_(transformer, seed=seed + 1)
    perturb_(vae, seed=seed + 2)
    transformer.eval(), vae.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, time_shift_type="linear")
    processor = tiny_vl_processor(tokenizer, tiny_qwen2vl_image_processor(max_pixels=448 * 448))
    return QwenImageLayeredPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    processor=processor, transformer=transformer)


@pytest.fixture(scope="session")
def qwen_layered_folder(tmp_path_factory):
    """A tiny Qwen-Image-Layered checkpoint folder."""
    folder = tmp_path_factory.mktemp("qwen") / "layered"
    build_qwen_layered().save_pretrained(folder)
    return folder
