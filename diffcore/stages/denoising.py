"""DenoisingStage: the sampling loop, with a CFG branch, per-timestep denoiser choice and a step-cache seam."""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import parallel
from ..configs.engine_args import EngineArgs
from ..request import Request
from .base import In, Out, PipelineStage
from .guidance import combine_rows, guided_rows, row_view, take_rows, uncond_kwargs_for


class DenoisingStage(PipelineStage):
    """Run the denoiser(s) over the timesteps and step the request's scheduler.

    ``transformers`` holds one model, or several that the config chooses between per timestep
    (``select_denoiser``; e.g. a two-expert model). Everything that changes during the loop lives on
    the Request (latents, scheduler, the step cache of this request), so one stage serves concurrent
    requests. Engine settings arrive through ``engine_args``: ``progress``, ``compile`` (the denoisers'
    forward is compiled here) and the step-cache policy (a fresh cache per request).
    Under CFG parallelism (the pipeline's parallel groups are current) each rank predicts one branch;
    the two predictions are all-gathered, then combined exactly as in one process. Which rows run the
    unconditional branch at a step is the config's per-step guidance policy (``guidance.py``).
    """

    inputs = (In("latents", torch.Tensor), In("timesteps", torch.Tensor), In("scheduler"), In("condition", dict),
              In("do_cfg", bool))
    outputs = (Out("latents", torch.Tensor),)
    consumes = ("condition",)  # freed after the loop: per-request tensors must not outlive it into decoding
    batch = "rows"

    def __init__(self, config, transformers: list, engine_args: Optional[EngineArgs] = None, name: str = "denoising"):
        super().__init__(name)
        engine_args = engine_args or EngineArgs()
        self.config, self.transformers = config, [t for t in transformers if t is not None]
        self.progress = engine_args.progress
        self.make_step_cache = engine_args.step_cache_factory()
        if engine_args.compile:  # opt-in: slow first call, faster steps
            for model in self.transformers:
                if isinstance(model, torch.nn.Module):
                    model.compile()

    def _predict(self, req: Request, model, latents, t, kwargs, step: int, branch: str) -> torch.Tensor:
        x = self.config.model_input(latents, req)
        timestep = self.config.model_timestep(t, x, req)
        if req.step_cache is not None:
            out = req.step_cache(model, step, branch, hidden_states=x, timestep=timestep, **kwargs)
        else:
            out = model(hidden_states=x, timestep=timestep, **kwargs)
        return self.config.model_output(out, req)

    def _predict_uncond(self, req: Request, model, latents, t, kwargs, step: int, rows: list[int]) -> torch.Tensor:
        """The unconditional prediction of ``rows`` only: called for just those rows where the config can
        select them (``condition_rows``), else for the whole batch and narrowed."""
        narrowed = uncond_kwargs_for(self.config, kwargs, rows, req)
        if narrowed is None:
            return take_rows(self._predict(req, model, latents, t, kwargs, step, "uncond"), rows, req.batch_size)
        view = row_view(req, rows)
        return self._predict(view, model, take_rows(latents, rows, req.batch_size), t, narrowed, step, "uncond")

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        scheduler, latents = req.scheduler, req.latents
        cond_kwargs, uncond_kwargs = req.condition["cond"], req.condition.get("uncond")
        if self.make_step_cache is not None and req.step_cache is None:
            req.step_cache = self.make_step_cache()
        if req.step_cache is not None:
            req.step_cache.reset(len(req.timesteps))
        groups = parallel.current()
        bar = tqdm(req.timesteps, desc="denoising", disable=not self.progress, leave=False)
        for i, t in enumerate(bar):
            expert = self.config.select_denoiser(t, req, len(self.transformers))
            model = self.transformers[expert]
            rows = guided_rows(self.config, req, i, t)  # the per-step guidance policy (stages/guidance.py)
            if rows and groups is not None and groups.cfg_parallel:
                # CFG parallel: this rank runs one branch; its partner rank runs the other
                branch = ("cond", "uncond")[groups.cfg_rank]
                mine = self._predict(req, model, latents, t, (cond_kwargs, uncond_kwargs)[groups.cfg_rank], i, branch)
                pred, uncond = groups.gather_branches(mine)
                uncond = take_rows(uncond, rows, req.batch_size)
            else:
                pred = self._predict(req, model, latents, t, cond_kwargs, i, "cond")
                if rows:
                    uncond = self._predict_uncond(req, model, latents, t, uncond_kwargs, i, rows)
            if rows:
                pred = combine_rows(self.config, pred, uncond, rows, t, req, expert)
            latents = scheduler.step(pred, t, latents)
            if req.callback is not None:
                req.callback(i, t, latents)
        req.latents = latents
        req.condition = None
        return req


class DecodingStage(PipelineStage):
    """Latents -> pixels in [0, 1] through the model's ``decode`` hook (VAE + latent normalisation)."""

    inputs = (In("latents", torch.Tensor), In("height", int), In("width", int))
    outputs = (Out("output", torch.Tensor),)
    batch = "rows"

    def __init__(self, config, components: dict, name: str = "decoding"):
        super().__init__(name)
        self.config, self.components = config, components

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        if req.params.output_type == "latent":
            req.output = req.latents
            return req
        req.output = self.config.decode(self.components, req.latents, req)
        return req
