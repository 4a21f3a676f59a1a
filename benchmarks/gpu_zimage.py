"""The Z-Image case of benchmarks/gpu.py: the Z-Image-Turbo transformer (6B) at its recipe, 1024x1024, 8 steps, no CFG.

1024x1024: a 128x128 latent, 64 x 64 = 4,096 image tokens, and a 100-token caption (padded to 128 with the learned
pad token), so 4,224 tokens per main-layer call. Each engine is called the way its pipeline calls it: diffusers with
lists of per-image latents and captions and the time ``1 - sigma``; diffcore with the batch and its per-request
layout (RoPE tables, masks) built once. Both outputs are negated into the flow velocity, as the pipelines do.
"""
from __future__ import annotations

import torch

Z_IMAGE_TURBO = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
                     n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
                     t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
TINY_ZIMAGE = {**Z_IMAGE_TURBO, "dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
               "cap_feat_dim": 32, "axes_dims": [8, 12, 12]}
SIZE = dict(height=1024, width=1024, steps=8, n_txt=100)
TINY_SIZE = dict(height=128, width=128, steps=2, n_txt=20)


def classes():
    import diffusers

    from diffcore_zimage.transformer import ZImageTransformer2DModel

    return diffusers.ZImageTransformer2DModel, ZImageTransformer2DModel


def case(size: dict, cfg: dict, device, dtype):
    g = torch.Generator(device).manual_seed(0)
    h, w = size["height"] // 8, size["width"] // 8
    latents = torch.randn(1, cfg["in_channels"], h, w, generator=g, device=device, dtype=torch.float32)
    cond = dict(encoder_hidden_states=torch.randn(1, size["n_txt"], cfg["cap_feat_dim"], generator=g, device=device,
                                                  dtype=dtype))
    return latents, [cond], 0.0


def callers(ref, ours, latents, conds):
    _, _, h, w = latents.shape
    layout = ours.layout([conds[0]["encoder_hidden_states"].shape[1]], (h // 2, w // 2), device=latents.device)
    dtype = conds[0]["encoder_hidden_states"].dtype

    def call_ref(x, t, c):
        out = ref(list(x.to(dtype).unsqueeze(2).unbind(0)), 1 - t, list(c["encoder_hidden_states"].unbind(0)),
                  return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def call_ours(x, t, c):
        return -ours(hidden_states=x, timestep=1 - t, encoder_hidden_states=c["encoder_hidden_states"], layout=layout)

    return call_ref, call_ours, 1.0
