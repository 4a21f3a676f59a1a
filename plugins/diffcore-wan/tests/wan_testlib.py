"""Tiny Wan checkpoints built with diffusers (the oracle), diffusers reference runs and comparison helpers."""
from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.weights import max_abs_diff, psnr

HIDDEN = 32  # 2 heads x 16
Z = 4  # latent channels of the tiny Wan 2.1-style VAE
Z22 = 8  # latent channels of the tiny Wan 2.2 (TI2V) VAE


def _stats(n: int, seed: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    mean = (torch.randn(n, generator=g) * 0.5).tolist()
    std = (0.5 + torch.rand(n, generator=g) * 1.5).tolist()
    return mean, std


def tiny_vae(ti2v: bool = False, base_dim: int = 8):
    from diffusers import AutoencoderKLWan

    if ti2v:  # Wan 2.2 layout: residual blocks, 2x2 patching, x16 spatial
        mean, std = _stats(Z22, 1)
        return AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=Z22, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
                                temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                                out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=mean,
                                latents_std=std)
    mean, std = _stats(Z, 0)
    return AutoencoderKLWan(base_dim=base_dim, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)


def tiny_transformer(in_channels: int, out_channels: int, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=32, freq_dim=16,
                                 ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 eps=1e-6, image_dim=image_dim, added_kv_proj_dim=HIDDEN if image_dim else None,
                                 rope_max_seq_len=1024)


def build_wan_pipeline(kind: str, seed: int = 0, vae_base_dim: int = 8):
    """kind: t2v21, t2v22 (two experts), ti2v (48-ch-style VAE, expand_timesteps), i2v21 (CLIP), i2v22."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    from diffcore.testing.text_encoders import tiny_clip_image_processor, tiny_clip_vision_model, tiny_umt5_encoder
    from diffcore.testing.tokenizers import tiny_t5_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer()
    text_encoder = tiny_umt5_encoder(tok, d_model=32, seed=seed)
    vae = perturb_(tiny_vae(ti2v=kind == "ti2v", base_dim=vae_base_dim), seed=seed + 1)
    z = Z22 if kind == "ti2v" else Z
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    common = dict(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler)
    i2v = kind.startswith("i2v")
    cin = 2 * z + 4 if i2v else z
    clip = tiny_clip_vision_model(hidden=32, image_size=32, patch=8, seed=seed + 5) if kind == "i2v21" else None
    transformer = perturb_(tiny_transformer(cin, z, image_dim=32 if clip is not None else None), seed=seed + 2)
    two = kind in ("t2v22", "i2v22")
    transformer_2 = perturb_(tiny_transformer(cin, z), seed=seed + 3) if two else None
    if i2v:
        return WanImageToVideoPipeline(**common, transformer=transformer, transformer_2=transformer_2,
                                       image_encoder=clip, image_processor=tiny_clip_image_processor(32) if clip else None,
                                       boundary_ratio=0.9 if two else None)
    return WanPipeline(**common, transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=0.875 if two else None, expand_timesteps=kind == "ti2v")


def save_as(pipe, folder, class_name: str, transformer_config: dict | None = None):
    """Save a diffusers Wan pipeline as a checkpoint of another pipeline class (same components)."""
    import json

    pipe.save_pretrained(folder)
    for name, extra in (("model_index.json", {"_class_name": class_name}),
                        ("transformer/config.json", transformer_config or {})):
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=2))
    return folder


KINDS = ("t2v21", "t2v22", "ti2v", "i2v21", "i2v22")


@functools.lru_cache(maxsize=None)
def ours(folder) -> DiffGenerator:
    return DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)


@functools.lru_cache(maxsize=None)
def reference(folder, kind: str, with_image: bool = False, flow_shift: float | None = None, variant: str | None = None):
    """The diffusers pipeline for a tiny folder, with its own scheduler_config.json (or ``flow_shift`` set
    the way diffusers' docs tell users to). TI2V + image runs diffusers' image-to-video pipeline with
    expand_timesteps on the same components, as diffusers documents for TI2V-5B."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    cls = WanImageToVideoPipeline if kind.startswith("i2v") else WanPipeline
    # Without accelerate diffusers refuses models with _keep_in_fp32_modules; in float32 it is a no-op.
    with mock.patch.object(WanTransformer3DModel, "_keep_in_fp32_modules", None):
        pipe = cls.from_pretrained(folder, variant=variant)
    if kind == "ti2v" and with_image:
        parts = {k: getattr(pipe, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")}
        pipe = WanImageToVideoPipeline(**parts, expand_timesteps=True)
    if flow_shift is not None:
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Acceptance bound: max |diff| <= 2e-3 and PSNR >= 45 dB over all frames of all videos."""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff, quality = max_abs_diff(got, want), psnr(got, want)
    print(f"parity: shape={got.shape} max|diff|={diff:.2e} psnr={quality:.1f} dB")  # shown with pytest -rP
    assert diff <= 2e-3 and quality >= 45, f"max|diff|={diff:.2e} psnr={quality:.1f}"
    return diff, quality


def run_both(folder, kind: str, image=None, ref_kwargs=None, seed: int = 7, **kwargs):
    """(diffcore output, diffusers output) as (B, F, H, W, 3) float arrays in [0, 1]."""
    extra = {"image": image} if image is not None else {}
    pipe = reference(folder, kind, with_image=image is not None, flow_shift=kwargs.get("flow_shift"))
    ref_args = {k: v for k, v in kwargs.items() if k != "flow_shift"}
    ref = pipe(**ref_args, **extra, **(ref_kwargs or {}), generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np").frames
    got = ours(folder).generate(**kwargs, **extra, seed=seed, output_type="np").output
    return got, ref
