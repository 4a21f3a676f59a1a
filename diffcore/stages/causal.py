"""CausalDMDDenoisingStage: block-causal few-step video generation with a KV cache (self-forcing).

The latent frames are split into blocks of ``config.causal.num_frames_per_block``. Each block runs
the DMD loop of ``DmdDenoisingStage`` while its self-attention sees a per-request KV cache of the
clean earlier blocks; then one more forward of the clean block at ``context_timestep`` writes its
clean keys/values into the cache for the blocks after it. Finished blocks are decoded at once (the
video VAE is causal in time, so this equals decoding the whole video at the end) and handed to the
request's ``block_callback``, which is what makes streaming possible. ``req.condition["cond"]`` is read
at the start of every block, so the callback may replace it (a prompt change mid-stream: diffcore.serve.realtime).

The model protocol (``diffcore.protocols.CausalModel``): ``model.new_kv_cache(latent_shape, window, sink)``
and ``forward(..., kv_cache=cache, start_frame=s)`` on one block of latent frames starting at frame ``s``.
Everything per generation (cache, block index, decoder state) is local to ``forward``. The stage's
time includes the block decodes; ``timings["block_decoding"]`` says how much of it they took.
"""
from __future__ import annotations

import time

import torch

from ..errors import ConfigError, SamplingParamError
from ..protocols import CausalModel
from ..request import Request
from .base import Out
from .dmd import DmdDenoisingStage, dmd_schedule


class CausalDMDDenoisingStage(DmdDenoisingStage):
    """Block-causal DMD sampling; with ``components`` (the pipeline's, for its VAE) it also decodes each
    finished block and writes ``output``, calling ``req.block_callback(block, latents, frames)``.

    The step cache is honoured: each block's DMD loop goes through it under a branch of its own (a block never
    reuses another block's residual; the first step of every block is computed), and the pass that writes the
    clean keys/values always runs in full."""

    outputs = (Out("latents", torch.Tensor), Out("output", torch.Tensor, required=False))
    hands_out_x0 = False  # a step sees one block: finished blocks go to block_callback instead

    def __init__(self, config, transformers: list, engine_args=None, *, components: dict | None = None):
        super().__init__(config, transformers, engine_args, components=components)
        if config.causal is None:
            raise ConfigError(f"{type(config).__name__} has no block-causal recipe (config.causal)")
        if len(self.transformers) != 1:
            raise ConfigError("block-causal generation runs one transformer (two-expert models are not causal)")
        if not isinstance(self.transformers[0], CausalModel):
            raise ConfigError(f"{type(self.transformers[0]).__name__} cannot denoise block by block: it has no "
                              "new_kv_cache (the diffcore.protocols.CausalModel protocol)")
        if components is not None:
            self.outputs = (Out("latents", torch.Tensor), Out("output", torch.Tensor))

    def loop(self, req: Request) -> torch.Tensor:
        causal, model = self.config.causal, self.transformers[0]
        timesteps, grid = dmd_schedule(self.config, req)
        latents = req.latents
        n, frames = causal.num_frames_per_block, latents.shape[2]
        if frames % n:
            raise SamplingParamError("num_frames", f"{frames} latent frames do not split into blocks of {n}")
        self.start_step_cache(req, len(timesteps))  # the steps of one block
        cache = model.new_kv_cache(latents.shape, causal.local_attn_size, causal.sink_size)
        decode = None
        if self.components is not None and req.params.output_type != "latent":
            decode = self.config.stream_decoder(self.components, req)
        out, pixels = torch.empty_like(latents), []
        num_blocks = frames // n
        for b in range(num_blocks):
            s = b * n
            # read per block: a block_callback may swap in another prompt's condition for the blocks after it
            kwargs = dict(req.condition["cond"], kv_cache=cache, start_frame=s)
            x0 = self.denoise(latents[:, :, s:s + n], timesteps, grid, kwargs, req,
                              bar_desc=f"block {b + 1}/{num_blocks}", branch=f"block{b}")
            context_t = torch.tensor(causal.context_timestep, dtype=torch.float32, device=x0.device)
            self.predict(req, model, x0, context_t, kwargs, 0, cached=False)  # writes the clean K/V
            out[:, :, s:s + n] = x0
            block_pixels = None
            if decode is not None:
                start = time.perf_counter()
                block_pixels = decode(x0, last=b == num_blocks - 1)
                pixels.append(block_pixels)
                req.timings["block_decoding"] = req.timings.get("block_decoding", 0.0) + time.perf_counter() - start
            if req.block_callback is not None:
                req.block_callback(b, x0, None if block_pixels is None else block_pixels.cpu().numpy())
        if self.components is not None:
            req.output = torch.cat(pixels, dim=1) if decode is not None else out
        return out
