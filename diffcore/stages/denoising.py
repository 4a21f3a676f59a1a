"""DenoisingStage: the sampling loop, with a CFG branch, per-timestep denoiser choice and a step-cache seam."""
from __future__ import annotations

import torch

from .. import finite, parallel
from ..request import Request
from .base import In, Out, PipelineStage
from .guidance import combine_rows, guided_rows, row_view, take_rows, uncond_kwargs_for
from .loop import DenoisingLoopStage


class DenoisingStage(DenoisingLoopStage):
    """Run the denoiser(s) over the timesteps and step the request's scheduler.

    Everything that changes during the loop lives on the Request (latents, scheduler, the step cache of
    this request), so one stage serves concurrent requests. Under CFG parallelism (the pipeline's
    parallel groups are current) each rank predicts one branch; the two predictions are all-gathered,
    then combined exactly as in one process. Which rows run the unconditional branch at a step is the
    config's per-step guidance policy (``guidance.py``).
    """

    inputs = (In("latents", torch.Tensor), In("timesteps", torch.Tensor), In("scheduler"), In("condition", dict),
              In("do_cfg", bool))
    batch = "rows"

    def _predict_uncond(self, req: Request, model, latents, t, kwargs, step: int, rows: list[int]) -> torch.Tensor:
        """The unconditional prediction of ``rows`` only: called for just those rows where the config can
        select them (``condition_rows``), else for the whole batch and narrowed."""
        narrowed = uncond_kwargs_for(self.config, kwargs, rows, req)
        if narrowed is None:
            return take_rows(self.predict(req, model, latents, t, kwargs, step, "uncond"), rows, req.batch_size)
        view = row_view(req, rows)
        return self.predict(view, model, take_rows(latents, rows, req.batch_size), t, narrowed, step, "uncond")

    def loop(self, req: Request) -> torch.Tensor:
        scheduler, latents = req.scheduler, req.latents
        cond_kwargs, uncond_kwargs = req.condition["cond"], req.condition.get("uncond")
        self.start_step_cache(req, len(req.timesteps))
        groups = parallel.current()
        for i, t in enumerate(self.steps(req.timesteps)):
            expert = self.config.select_denoiser(t, req, len(self.transformers))
            model = self.transformers[expert]
            rows = guided_rows(self.config, req, i, t)  # the per-step guidance policy (stages/guidance.py)
            if rows and groups is not None and groups.cfg_parallel:
                # CFG parallel: this rank runs one branch; its partner rank runs the other
                branch = ("cond", "uncond")[groups.cfg_rank]
                mine = self.predict(req, model, latents, t, (cond_kwargs, uncond_kwargs)[groups.cfg_rank], i, branch)
                pred, uncond = groups.gather_branches(mine)
                uncond = take_rows(uncond, rows, req.batch_size)
            else:
                pred = self.predict(req, model, latents, t, cond_kwargs, i, "cond")
                if rows:
                    uncond = self._predict_uncond(req, model, latents, t, uncond_kwargs, i, rows)
            if rows:
                pred = combine_rows(self.config, pred, uncond, rows, t, req, expert)
            x0 = scheduler.predicted_x0(pred, t, latents) if self.wants_x0(req) else None
            latents = scheduler.step(pred, t, latents)
            self.step_done(req, i, len(req.timesteps), t, latents, x0)
        return latents


class DecodingStage(PipelineStage):
    """Latents -> pixels in [0, 1] through the model's ``decode`` hook (VAE + latent normalisation)."""

    inputs = (In("latents", torch.Tensor), In("height", int), In("width", int))
    outputs = (Out("output", torch.Tensor),)
    batch = "rows"

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        finite.check_latents(req.latents, req)  # NaN would decode to a black picture: an error naming the cause
        if req.params.output_type == "latent":
            req.output = req.latents = self.config.latent_output(self.components, req.latents, req)
            return req
        req.output = self.config.decode(self.components, req.latents, req)
        finite.check_output(req.output, req)
        return req
