"""CausalDMDDenoisingStage: block-causal few-step video generation with a KV cache (self-forcing).

The latent frames are split into blocks of ``config.causal.num_frames_per_block``. Each block runs
the DMD loop of ``DmdDenoisingStage`` while its self-attention sees a per-request KV cache of the
clean earlier blocks; then one more forward of the clean block at ``context_timestep`` writes its
clean keys/values into the cache for the blocks after it. Finished blocks are decoded at once (the
video VAE is causal in time, so this equals decoding the whole video at the end) and handed to the
request's ``block_callback``, which is what makes streaming possible.

The model protocol: ``model.new_kv_cache(latent_shape, window, sink)`` and ``forward(...,
kv_cache=cache, start_frame=s)`` on one block of latent frames starting at video frame ``s``.
Everything per generation (cache, block index, decoder state) is local to ``forward``. The stage's
time includes the block decodes; ``timings["block_decoding"]`` says how much of it they took.
"""
from __future__ import annotations

import time

import torch

from ..errors import ConfigError
from ..request import Request
from .base import In, Out
from .dmd import DmdDenoisingStage, dmd_schedule, predict


class CausalDMDDenoisingStage(DmdDenoisingStage):
    """Block-causal DMD sampling; with ``components`` (the pipeline's, for its VAE) it also decodes each
    finished block and writes ``output``, calling ``req.block_callback(block, latents, frames)``."""

    inputs = (In("latents", torch.Tensor), In("condition", dict), In("generator", torch.Generator))
    outputs = (Out("latents", torch.Tensor), Out("output", torch.Tensor, required=False))
    consumes = ("condition",)  # freed after the loop: per-request tensors must not outlive it

    def __init__(self, config, transformers: list, components: dict | None = None, name: str = "denoising",
                 progress: bool = True, callback=None):
        super().__init__(config, transformers, name=name, progress=progress, callback=callback)
        if config.causal is None:
            raise ConfigError(f"{type(config).__name__} has no block-causal recipe (config.causal)")
        if len(self.transformers) != 1:
            raise ConfigError("block-causal generation runs one transformer (two-expert models are not causal)")
        self.components = components
        if components is not None:
            self.outputs = (Out("latents", torch.Tensor), Out("output", torch.Tensor))

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        causal, model = self.config.causal, self.transformers[0]
        timesteps, grid = dmd_schedule(self.config, req)
        latents = req.latents
        n, frames = causal.num_frames_per_block, latents.shape[2]
        if frames % n:
            raise ConfigError(f"{frames} latent frames do not split into blocks of {n}")
        cache = model.new_kv_cache(latents.shape, causal.local_attn_size, causal.sink_size)
        decode = None
        if self.components is not None and req.params.output_type != "latent":
            decode = self.config.stream_decoder(self.components, req)
        cond, out, pixels = req.condition["cond"], torch.empty_like(latents), []
        num_blocks = frames // n
        for b in range(num_blocks):
            s = b * n
            kwargs = dict(cond, kv_cache=cache, start_frame=s)
            x0 = self.denoise(latents[:, :, s:s + n], timesteps, grid, kwargs, req,
                              bar_desc=f"block {b + 1}/{num_blocks}")
            predict(self.config, model, x0, causal.context_timestep, kwargs, req)  # writes the clean K/V
            out[:, :, s:s + n] = x0
            block_pixels = None
            if decode is not None:
                start = time.perf_counter()
                block_pixels = decode(x0, last=b == num_blocks - 1)
                pixels.append(block_pixels)
                req.timings["block_decoding"] = req.timings.get("block_decoding", 0.0) + time.perf_counter() - start
            if req.block_callback is not None:
                req.block_callback(b, x0, None if block_pixels is None else block_pixels.cpu().numpy())
        req.latents, req.condition = out, None
        if self.components is not None:
            req.output = torch.cat(pixels, dim=1) if decode is not None else out
        return req
