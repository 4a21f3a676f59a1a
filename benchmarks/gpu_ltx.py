"""The LTX-2 case of benchmarks/gpu.py: the 19B audio-video transformer, both streams denoised together.

512x768x121 frames at 24 fps: 16 x 16 x 24 = 6,144 video tokens and 126 audio tokens (25 per second), 1024
text tokens, 4 steps with CFG 3.0 (8 calls). The latents are joint rows (video tokens, then audio tokens), as
diffcore's LTX-2 pipeline holds them; each engine is called with its own per-request precomputation (diffcore:
the RoPE tables once per request).
"""
from __future__ import annotations

import torch

LTX_2 = dict(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
             audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=32, audio_attention_head_dim=64,
             audio_cross_attention_dim=2048, num_layers=48, caption_channels=3840, rope_type="split")
TINY_LTX = {**LTX_2, "num_attention_heads": 2, "attention_head_dim": 32, "cross_attention_dim": 64,
            "audio_num_attention_heads": 2, "audio_attention_head_dim": 16, "audio_cross_attention_dim": 32,
            "num_layers": 2, "caption_channels": 16}
SIZE = dict(frames=121, height=512, width=768, steps=4, n_txt=1024)
TINY_SIZE = dict(frames=9, height=64, width=96, steps=2, n_txt=16)


def classes():
    import diffusers

    from diffcore_ltx.transformer import LTX2VideoTransformer3DModel

    return diffusers.LTX2VideoTransformer3DModel, LTX2VideoTransformer3DModel


def sizes(size: dict) -> tuple[int, int, int, int]:
    """Latent frames, height, width and audio frames of the video at 24 fps."""
    return (size["frames"] - 1) // 8 + 1, size["height"] // 32, size["width"] // 32, round(size["frames"] / 24 * 25)


def case(size: dict, cfg: dict, device, dtype):
    f, h, w, a = sizes(size)
    g = torch.Generator(device).manual_seed(0)
    n = f * h * w * cfg["in_channels"] + a * cfg["audio_in_channels"]
    latents = torch.randn(1, n, generator=g, device=device, dtype=torch.float32)
    conds = [{k: torch.randn(1, size["n_txt"], cfg["caption_channels"], generator=g, device=device, dtype=dtype)
              for k in ("encoder_hidden_states", "audio_encoder_hidden_states")} for _ in range(2)]
    conds[0]["size"] = conds[1]["size"] = size  # read by callers(), not passed to the models
    return latents, conds, 3.0


def callers(ref, ours, latents, conds):
    cfg, size = ours.config, conds[0]["size"]
    f, h, w, a = sizes(size)
    rope = ours.positions.for_request(1, f, h, w, a, 24.0, device=latents.device)
    dtype, n_video = conds[0]["encoder_hidden_states"].dtype, f * h * w * cfg["in_channels"]

    def run(model, x, t, c, **extra):
        video = x[:, :n_video].reshape(1, -1, cfg["in_channels"]).to(dtype)
        audio = x[:, n_video:].reshape(1, a, -1).to(dtype)
        texts = {k: v for k, v in c.items() if k != "size"}
        out = model(hidden_states=video, audio_hidden_states=audio, timestep=t, sigma=t, num_frames=f, height=h,
                    width=w, fps=24.0, audio_num_frames=a, use_cross_timestep=True, **texts, **extra)
        return torch.cat([out[0].flatten(1), out[1].flatten(1)], dim=1)

    return (lambda x, t, c: run(ref, x, t, c, return_dict=False),
            lambda x, t, c: run(ours, x, t, c, rotary_emb=rope), 1000.0)
