"""DenoisingLoopStage: what the three denoising loops (standard, few-step DMD, block-causal) share.

One constructor shape, ``(config, transformers, engine_args=None, *, components=None)``; the engine
settings every loop honours (``progress``, ``compile``, and the running pipeline's step-cache policy: a
fresh cache per request); one model call through the config's input / timestep / output hooks and the request's step
cache; the end of every step (``step_done``: the request's callback, then its ``x0_callback`` with the predicted
clean latents, which previews decode); and the end of every loop: the latents written, the per-request
``condition`` freed. Subclasses implement ``loop(req)``. The stage's name belongs to the pipeline (``add_stage``), not to the stage.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from ..cache.base import FACTORY
from ..configs.engine_args import EngineArgs
from ..request import Request
from .base import Out, PipelineStage


class DenoisingLoopStage(PipelineStage):
    """Base of the denoising stages. ``transformers``: one model, or several the config chooses between per
    timestep (``select_denoiser``; e.g. a two-expert model); ``None`` entries (absent optional components)
    are dropped. ``components``: the pipeline's, for stages that also decode (block-causal streaming)."""

    outputs = (Out("latents", torch.Tensor),)
    consumes = ("condition",)  # freed after the loop: per-request tensors must not outlive it into decoding
    # Whether ``step_done`` hands each step's predicted clean latents of the whole image to ``req.x0_callback``
    # (previews). The block-causal loop does not (its steps see one block; it streams finished blocks instead).
    hands_out_x0: bool = True

    def __init__(self, config, transformers: list, engine_args: Optional[EngineArgs] = None, *,
                 components: Optional[dict] = None):
        super().__init__()
        engine_args = engine_args or EngineArgs()
        self.config, self.components = config, components
        self.transformers = [t for t in transformers if t is not None]
        self.progress = engine_args.progress
        if engine_args.compile:  # opt-in: slow first call, faster steps
            for model in self.transformers:
                if isinstance(model, torch.nn.Module):
                    model.compile()

    def start_step_cache(self, req: Request, num_steps: int) -> None:
        """This request's own step cache (concurrent requests never share one; made with the running
        pipeline's policy, ``cache.FACTORY``), reset for ``num_steps``."""
        make = FACTORY.get()
        if make is not None and req.step_cache is None:
            req.step_cache = make()
        if req.step_cache is not None:
            req.step_cache.reset(num_steps)

    def predict(self, req: Request, model, x: torch.Tensor, t: torch.Tensor, kwargs: dict, step: int,
                branch: str = "cond", cached: bool = True) -> torch.Tensor:
        """One model call through the config's hooks, through the request's step cache unless ``cached=False``."""
        inp = self.config.model_input(x, req)
        timestep = self.config.model_timestep(t, inp, req)
        cache = req.step_cache if cached else None
        if cache is not None:
            out = cache(model, step, branch, hidden_states=inp, timestep=timestep, **kwargs)
        else:
            out = model(hidden_states=inp, timestep=timestep, **kwargs)
        return self.config.model_output(out, req)

    def wants_x0(self, req: Request) -> bool:
        """Whether this step's predicted clean latents are wanted (computing them costs a little): ``step_done``'s
        ``x0`` may be left None otherwise."""
        return self.hands_out_x0 and req.x0_callback is not None

    def step_done(self, req: Request, step: int, num_steps: int, t, latents: torch.Tensor,
                  x0: Optional[torch.Tensor] = None) -> None:
        """The end of denoising step ``step`` (from 0) of ``num_steps``: ``req.callback(step, t, latents)`` (which
        raises ``RequestCancelledError`` to stop a cancelled request here), then ``req.x0_callback(step,
        num_steps, x0)`` with the predicted clean latents, in the latents' own (packed) layout."""
        if req.callback is not None:
            req.callback(step, t, latents)
        if x0 is not None and self.wants_x0(req):
            req.x0_callback(step, num_steps, x0)

    def steps(self, timesteps: Iterable, desc: str = "denoising"):
        """``timesteps`` behind the engine's progress bar."""
        return tqdm(timesteps, desc=desc, disable=not self.progress, leave=False)

    def loop(self, req: Request) -> torch.Tensor:
        """Denoise ``req.latents``; returns the final latents."""
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        req.latents = self.loop(req)
        req.condition = None
        return req
