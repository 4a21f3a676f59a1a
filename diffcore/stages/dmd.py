"""DmdDenoisingStage: few-step sampling for distribution-matching-distilled (DMD) flow models.

A DMD student predicts the clean sample from any noise level in one call, so sampling is a short
fixed list of integer timesteps (e.g. ``[1000, 757, 522]``): at each one the model predicts the
flow velocity ``v``, ``x0 = x_t - sigma(t) * v``, and, except after the last, ``x0`` is noised
again to the next timestep with fresh Gaussian noise. There is no CFG (the guidance is distilled
in) and no scheduler state. Numerics follow SGLang diffusion's / FastVideo's DmdDenoisingStage:
sigma(t) is looked up on the 1000-step shifted flow-matching grid at the nearest grid timestep,
``x0`` is formed in float64, and the re-noising noise continues the request's seeded CPU
generator (the one that drew the initial latents).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..configs.fewstep import DmdConfig
from ..errors import ConfigError
from ..request import Request
from .base import In
from .loop import DenoisingLoopStage

NUM_TRAIN_TIMESTEPS = 1000


class FlowGrid:
    """The 1000-step shifted flow-matching grid (diffusers' FlowMatchEulerDiscreteScheduler at ``shift``,
    before ``set_timesteps``): ``s_i = i / 1000`` for i = 1000..1, ``sigma_i = k s_i / (1 + (k - 1) s_i)``,
    ``t_i = 1000 sigma_i``; float32 like the scheduler's own tensors."""

    def __init__(self, shift: float, n: int = NUM_TRAIN_TIMESTEPS):
        s = torch.linspace(1, n, n, dtype=torch.float32).flip(0) / n
        self.sigmas = shift * s / (1 + (shift - 1) * s)
        self.timesteps = self.sigmas * n
        self.n = n

    def sigma(self, t: torch.Tensor | float) -> float:
        """sigma of the grid timestep nearest to ``t`` (as SGLang's pred_noise_to_pred_video / add_noise)."""
        t = float(t)
        if t <= 0:
            return 0.0
        index = int(torch.argmin((self.timesteps.double() - t).abs()))
        return float(self.sigmas[index])

    def warp(self, timesteps: Sequence[float]) -> list[float]:
        """``cat(grid timesteps, [0])[1000 - t]`` (self-forcing's warp_denoising_step)."""
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return [float(table[self.n - int(t)]) for t in timesteps]


def dmd_schedule(config, req: Request) -> tuple[list[float], FlowGrid]:
    """The request's timesteps (``params.timesteps`` or the config's, warped if the recipe says so) and grid."""
    dmd: Optional[DmdConfig] = config.dmd
    if dmd is None:
        raise ConfigError(f"{type(config).__name__} has no few-step recipe (config.dmd); a DMD stage needs one")
    shift = req.params.flow_shift or dmd.shift
    grid = FlowGrid(shift)
    timesteps = list(req.params.timesteps or dmd.timesteps)
    return (grid.warp(timesteps) if dmd.warp else [float(t) for t in timesteps]), grid


def to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x0 = x_t - sigma * v`` in float64 (SGLang), returned in ``x_t``'s dtype."""
    high = torch.float64 if x_t.device.type != "mps" else torch.float32
    return (x_t.to(high) - sigma * v.to(high)).to(x_t.dtype)


def renoise(x0: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma eps`` with eps ~ N(0, 1) drawn in float32 on the CPU from ``generator``."""
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device="cpu").to(x0.device)
    return ((1 - sigma) * x0 + sigma * eps).to(x0.dtype)


class DmdDenoisingStage(DenoisingLoopStage):
    """Few-step DMD sampling over ``config.dmd.timesteps`` (or the request's ``timesteps``).

    Reads the same ``condition`` as DenoisingStage (only its ``cond`` branch: no CFG) and calls the same
    ``callback(step, timestep, latents)`` after every step.
    """

    inputs = (In("latents", torch.Tensor), In("condition", dict), In("generator", torch.Generator))

    def loop(self, req: Request) -> torch.Tensor:
        timesteps, grid = dmd_schedule(self.config, req)
        self.start_step_cache(req, len(timesteps))
        return self.denoise(req.latents, timesteps, grid, req.condition["cond"], req)

    def denoise(self, x: torch.Tensor, timesteps: list[float], grid: FlowGrid, kwargs: dict, req: Request,
                bar_desc: str = "denoising", branch: str = "cond") -> torch.Tensor:
        """The DMD loop on ``x`` (pure noise at ``timesteps[0]``); returns the final ``x0``. ``branch`` names
        the step cache's memory of this loop."""
        for i, t in enumerate(self.steps(timesteps, bar_desc)):
            model = self.transformers[self.config.select_denoiser(torch.tensor(t), req, len(self.transformers))]
            v = self.predict(req, model, x, torch.tensor(t, dtype=torch.float32, device=x.device), kwargs, i, branch)
            x = x0 = to_x0(x, v, grid.sigma(t))
            if i < len(timesteps) - 1:
                x = renoise(x, grid.sigma(timesteps[i + 1]), req.generator)
            self.step_done(req, i, len(timesteps), torch.tensor(t), x, x0)
        return x
