"""Write a tiny toy checkpoint in Diffusers format by hand: model_index.json + one folder per component."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from diffcore.models.autoencoder_kl import AutoencoderKL
from diffcore.testing.text_encoders import tiny_clip_text_model
from diffcore.testing.tokenizers import tiny_clip_tokenizer
from diffcore.testing.weights import perturb_

from .model import ToyTransformer2DModel

DEFAULT_FOLDER: Optional[Path] = None  # set by the test fixture; the "toy" alias points here

TRANSFORMER = dict(in_channels=16, hidden_size=32, num_heads=2, num_layers=1, joint_attention_dim=32,
                   pooled_projection_dim=32)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
           latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.6, shift_factor=0.1,
           use_quant_conv=False, use_post_quant_conv=False)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def default_folder() -> Path:
    if DEFAULT_FOLDER is None:
        raise RuntimeError("toy checkpoint not written yet")
    return DEFAULT_FOLDER


def _write_module(folder: Path, class_name: str, config: dict, module: torch.nn.Module) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **config}, indent=1))
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")


def write_toy_checkpoint(folder: Path, seed: int = 0, variant: Optional[str] = None,
                         drop: tuple[str, ...] = ()) -> Path:
    """Write the toy model to ``folder``; ``drop`` leaves components out of model_index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = perturb_(ToyTransformer2DModel(**TRANSFORMER), seed=seed)
        vae = perturb_(AutoencoderKL(**VAE), seed=seed + 1)
    _write_module(folder / "transformer", "ToyTransformer2DModel", TRANSFORMER, transformer)
    _write_module(folder / "vae", "AutoencoderKL", VAE, vae)
    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    tiny_clip_text_model(tokenizer, seed=seed + 2).save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER}))
    index = {
        "_class_name": "ToyPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "ToyTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None],  # an absent optional component, as diffusers writes it
    }
    if variant is not None:
        index["toy_variant"] = variant
    for name in drop:
        index.pop(name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder
