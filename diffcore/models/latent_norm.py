"""Latent normalisation read from the VAE's own config, so every family shares one code path.

Wan / Qwen VAEs store per-channel ``latents_mean`` / ``latents_std``; AutoencoderKL (FLUX) stores a
``scaling_factor`` and ``shift_factor``.
"""
from __future__ import annotations

import torch


def _stats(vae, z: torch.Tensor):
    cfg = vae.config
    if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
        shape = [1, -1] + [1] * (z.ndim - 2)
        mean = torch.tensor(cfg["latents_mean"], dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(cfg["latents_std"], dtype=z.dtype, device=z.device).view(shape)
        return mean, std, None, None
    return None, None, cfg.get("scaling_factor") or 1.0, cfg.get("shift_factor") or 0.0


def normalize(z: torch.Tensor, vae) -> torch.Tensor:
    """VAE latent -> diffusion latent."""
    mean, std, scale, shift = _stats(vae, z)
    if mean is not None:
        return (z - mean) * (1.0 / std)
    return (z - shift) * scale


def denormalize(z: torch.Tensor, vae) -> torch.Tensor:
    """Diffusion latent -> VAE latent."""
    mean, std, scale, shift = _stats(vae, z)
    if mean is not None:
        return z / (1.0 / std) + mean
    return z / scale + shift
