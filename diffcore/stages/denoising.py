"""DenoisingStage: the sampling loop, with a CFG branch, per-timestep denoiser choice and a step-cache seam."""
from __future__ import annotations

import torch

from .. import finite, parallel
from ..request import Request
from .base import In, Out, PipelineStage
from .guidance import guided_rows, row_view, take_rows, uncond_kwargs_for
from .loop import DenoisingLoopStage


class DenoisingStage(DenoisingLoopStage):
    """Run the denoiser(s) over the timesteps and step the request's scheduler.

    Everything that changes during the loop lives on the Request (latents, scheduler, the step cache of
    this request), so one stage serves concurrent requests. A step's predictions are branches: the
    conditional one, the unconditional one for the rows the config's per-step guidance policy guides
    (``guidance.py``), and any extra ones the config asks for (``guidance_branches``); the config combines
    them (``combine_predictions``). Under CFG parallelism (the pipeline's parallel groups are current) the
    two ranks of a CFG group share the branches out and all-gather them, then combine exactly as in one
    process.
    """

    inputs = (In("latents", torch.Tensor), In("timesteps", torch.Tensor), In("scheduler"), In("condition", dict),
              In("do_cfg", bool))
    batch = "rows"

    def wants_x0(self, req: Request) -> bool:
        """A plugin scheduler without ``predicted_x0`` serves no previews (the request runs as without them)."""
        return super().wants_x0(req) and hasattr(req.scheduler, "predicted_x0")

    def predict_uncond(self, req: Request, model, latents, t, kwargs, step: int, rows: list[int]) -> torch.Tensor:
        """The unconditional prediction of ``rows`` only: called for just those rows where the config can
        select them (``condition_rows``), else for the whole batch and narrowed. ``t``: a timestep, or one
        per row (B,) (rows at different steps: diffcore.engine.stepping)."""
        narrowed = uncond_kwargs_for(self.config, kwargs, rows, req)
        if narrowed is None:
            return take_rows(self.predict(req, model, latents, t, kwargs, step, "uncond"), rows, req.batch_size)
        view = row_view(req, rows)
        if t.ndim == 1 and t.shape[0] == req.batch_size:
            t = take_rows(t, rows, req.batch_size)
        return self.predict(view, model, take_rows(latents, rows, req.batch_size), t, narrowed, step, "uncond")

    def _predict_branches(self, req: Request, model, latents, t, step: int, rows: list[int], names: list[str],
                          groups) -> dict:
        """Every prediction the step needs, by branch name. Under CFG parallelism the branches are shared out
        between the two ranks of a CFG group (``gather_branches``), the unconditional one for the whole batch."""
        condition = req.condition

        def one(name: str, whole: bool) -> torch.Tensor:
            if name == "uncond" and not whole:
                return self.predict_uncond(req, model, latents, t, condition.get("uncond"), step, rows)
            return self.predict(req, model, latents, t, condition[name], step, name)

        if groups is None or not groups.cfg_parallel or len(names) == 1:
            preds = self._predict_cfg_pair(req, model, latents, t, step, rows) if "uncond" in names else {}
            return {**preds, **{name: one(name, whole=False) for name in names if name not in preds}}
        mine = [one(name, whole=True) for name in names[groups.cfg_rank::2]]
        preds = dict(zip(names, groups.gather_branches(mine, len(names))))
        if "uncond" in preds:
            preds["uncond"] = take_rows(preds["uncond"], rows, req.batch_size)
        return preds

    def _predict_cfg_pair(self, req: Request, model, latents, t, step: int, rows: list[int]) -> dict:
        """The conditional and unconditional predictions as one call of twice the batch (``[uncond, cond]``, as
        diffusers batches CFG), when the config merges their kwargs (``merge_branches``), every row is guided and
        no step cache keys calls by branch; else {} (separate calls)."""
        if len(rows) != req.batch_size or req.step_cache is not None:
            return {}
        condition = req.condition
        merged = self.config.merge_branches([condition["uncond"], condition["cond"]], req)
        if merged is None:
            return {}
        uncond, cond = self.predict(req, model, torch.cat([latents, latents]), t, merged, step, "cond").chunk(2)
        return {"cond": cond, "uncond": uncond}

    def loop(self, req: Request) -> torch.Tensor:
        scheduler, latents = req.scheduler, req.latents
        self.start_step_cache(req, len(req.timesteps))
        groups = parallel.current()
        for i, t in enumerate(self.steps(req.timesteps)):
            expert = self.config.select_denoiser(t, req, len(self.transformers))
            model = self.transformers[expert]
            rows = guided_rows(self.config, req, i, t)  # the per-step guidance policy (stages/guidance.py)
            names = ["cond", *(["uncond"] if rows else []), *self.config.guidance_branches(req, i, t)]
            preds = self._predict_branches(req, model, latents, t, i, rows, names, groups)
            pred = self.config.combine_predictions(preds, rows, latents, t, req, expert)
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
