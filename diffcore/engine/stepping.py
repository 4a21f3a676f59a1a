"""Step-level batching: a running batch whose rows change between two denoising steps.

``run_batch`` merges requests once, before the stages that run over rows, and runs the merged Request to its
end. A ``StepBatch`` instead holds requests that each ran alone up to the denoising stage (text encoding,
noise, timesteps and scheduler, conditioning: as ``generate`` would) and drives that stage one step at a time
over all of them:

* every row has its own timestep position: a request that joins a running batch starts at its own step 0
  next to rows at step 30, and requests with different step counts or schedules share calls. At a step, the
  transformer gets one timestep per row (a (B,) tensor, or the scalar when all rows agree), each request's
  rows are guided (CFG) by the config's per-step policy at that request's own step, and each request's own
  scheduler steps its own rows (its own sigmas, its own solver state). So each result equals its solo run,
  whenever it joined and whoever left.
* a request leaves at a step boundary: finished (it is decoded alone and answered at once) or cancelled (its
  step callback raised ``RequestCancelledError``): its rows are not computed again.
* when the rows change, the merged Request is rebuilt (``rows.merge``) and the pipeline's conditioning
  stages run again over it (cheap per-batch constants: position ids, RoPE tables, masks).

Which pipelines can: ``step_stage`` (the standard ``DenoisingStage`` with one denoiser, a pipeline that batches
at all, no step cache, and a config whose ``step_rows`` is true). Few-step (DMD), block-causal and LTX-2 rows,
two-expert models (the expert is chosen per step), step caches and CFG-parallel torchrun batches run through
``run_batch`` (start-only batches) instead. The scheduler decides who joins (``BatchScheduler``); this
module only runs the rows it is given.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import torch

from .. import ignored
from ..errors import ConfigError
from ..request import Request
from ..stages.denoising import DenoisingStage
from ..stages.guidance import guided_rows
from . import rows


def step_stage(pipeline) -> Optional[int]:
    """Index of the denoising stage that ``StepBatch`` can drive row by row in ``pipeline`` (a composition),
    or None where its requests run in start-only batches (see the module docstring)."""
    from .batching import batch_plan

    if batch_plan(pipeline) is None or pipeline.cache_policy is not None or not pipeline.config.step_rows:
        return None
    found = [i for i, s in enumerate(pipeline.stages) if isinstance(s, DenoisingStage)]
    if len(found) != 1 or type(pipeline.stages[found[0]]) is not DenoisingStage:
        return None
    return found[0] if len(pipeline.stages[found[0]].transformers) == 1 else None


def step_key(pipeline, req: Request) -> Optional[tuple]:
    """Requests with equal keys can share denoising steps though their schedules differ (``rows.share_key``
    of the composition they ask for, with CFG on or off); None for one that runs in start-only batches."""
    pipeline = pipeline.for_request(req)
    if req.step_cache is not None or step_stage(pipeline) is None:
        return None
    return (id(pipeline),) + rows.share_key(pipeline, req, req.do_cfg)


class Row:
    """One request in a step batch: its Request (prepared up to denoising), its latents now, its next step, and
    the hold on its adapters (``LoraManager.in_use``: unloading one waits until the request has left, as it
    waits for a running generate)."""

    __slots__ = ("req", "token", "latents", "index", "hold")

    def __init__(self, req: Request, token: Any, hold: contextlib.ExitStack):
        self.req, self.token, self.latents, self.index, self.hold = req, token, req.latents, 0, hold

    @property
    def done(self) -> bool:
        return self.index >= len(self.req.timesteps)


class StepBatch:
    """Requests of one step key denoised together one step at a time (see the module docstring).

    ``add(req, token)`` prepares a validated Request alone up to the denoising stage and makes it a row (an
    exception there is that request's own); ``step()`` runs one step over every row and returns
    ``[(token, outcome)]`` for the requests that left: their finished Request (decoded), or the exception they
    ended with (``RequestCancelledError`` from their step callback). ``calls`` counts steps run."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.at = step_stage(pipeline)
        if self.at is None:
            raise ValueError(f"{pipeline.pipeline_name}'s requests cannot be stepped row by row (see step_stage)")
        self.stage: DenoisingStage = pipeline.stages[self.at]
        self.rows: list[Row] = []
        self.steps = 0
        self._merged: Optional[Request] = None

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, req: Request, token: Any) -> None:
        hold = contextlib.ExitStack()
        try:
            hold.enter_context(self.pipeline.loras.in_use(req))
            req = self.pipeline.forward(req, stop=self.at)
        except BaseException:
            hold.close()
            raise
        self.rows.append(Row(req, token, hold))
        self._merged = None

    def close(self) -> None:
        """Drop every row (their adapters are released)."""
        for r in self.rows:
            r.hold.close()
        self.rows, self._merged = [], None

    def step(self) -> list[tuple[Any, Any]]:
        if self._merged is None:
            self._merged = self._merge()
        batch, live = self._merged, self.rows
        ts = [r.req.timesteps[r.index] for r in live]
        reads: set = set()
        start = time.perf_counter()
        with self.pipeline.running(batch), ignored.recording(reads), torch.inference_mode():
            preds = self._predict(batch, live, ts)
            x0s = []
            for r, t, pred in zip(live, ts, preds):  # each request's own scheduler: its own sigmas and state
                wants = self.stage.wants_x0(r.req)  # previews: the predicted clean latents
                x0s.append(r.req.scheduler.predicted_x0(pred, t, r.latents) if wants else None)
                r.latents = r.req.scheduler.step(pred, t, r.latents)
        took = time.perf_counter() - start
        self.steps += 1
        left = []
        for r, t, x0 in zip(live, ts, x0s):
            r.req.params_read |= reads
            r.req.timings[self.stage.name] = r.req.timings.get(self.stage.name, 0.0) + took
            r.index += 1
            try:  # its step callback (cancelled: RequestCancelledError), then its preview
                self.stage.step_done(r.req, r.index - 1, len(r.req.timesteps), t, r.latents, x0)
            except Exception as exc:  # cancelled (RequestCancelledError), or its own callback failed: it alone
                left.append((r, exc))
                continue
            if r.done:
                left.append((r, self._finish(r)))
        if left:
            gone = {id(r) for r, _ in left}
            self.rows = [r for r in self.rows if id(r) not in gone]
            self._merged = None
            for r, _ in left:
                r.hold.close()
        return [(r.token, outcome) for r, outcome in left]

    # -- inside ----------------------------------------------------------------------------
    def _merge(self) -> Request:
        """The Request the transformer sees: one row's own (prepared alone), or the rows merged with their
        conditioning stages run again over the merged rows."""
        parts = [r.req for r in self.rows]
        if len(parts) == 1:
            return parts[0]
        batch = rows.merge(parts)
        batch.callback = batch.x0_callback = None  # StepBatch calls each request's own
        with self.pipeline.running(batch), ignored.recording(batch.params_read), torch.inference_mode():
            for stage in self.pipeline.stages[:self.at]:
                if any(f.name == "condition" for f in stage.outputs):
                    batch = stage(batch)
        return batch

    def _predict(self, batch: Request, live: list[Row], ts: list) -> list[torch.Tensor]:
        """Every row's guided prediction at its own timestep, from one conditional call over all rows and one
        unconditional call over the rows whose request is guided at its own step."""
        stage, config = self.stage, self.stage.config
        model = stage.transformers[0]
        x = torch.cat([r.latents for r in live]) if len(live) > 1 else live[0].latents
        same = all(bool(t == ts[0]) for t in ts)
        t_all = ts[0] if same else torch.cat([t.reshape(1).expand(r.req.batch_size) for r, t in zip(live, ts)])
        cond, uncond_kwargs = batch.condition["cond"], batch.condition.get("uncond")
        step = live[0].index  # for a step cache only, and StepBatch runs without one
        pred = stage.predict(batch, model, x, t_all, cond, step, "cond")
        spans, guided, mine, start = [], [], [], 0
        for r, t in zip(live, ts):
            if config.guidance_branches(r.req, r.index, t):
                raise ConfigError(f"{type(config).__name__} guides with extra branches, which StepBatch does not run: "
                                  "its config must set step_rows = False")
            own = guided_rows(config, r.req, r.index, t)  # the request's own per-step guidance policy
            mine.append(own)
            guided += [start + i for i in own]
            spans.append((start, start + r.req.batch_size))
            start += r.req.batch_size
        uncond = stage.predict_uncond(batch, model, x, t_all, uncond_kwargs, step, guided) if guided else None
        out, k = [], 0
        for r, t, own, (a, b) in zip(live, ts, mine, spans):
            preds = {"cond": pred[a:b]}
            if own:  # the request's own guidance at its own step, as its solo loop combines it
                preds["uncond"] = uncond[k:k + len(own)]
                k += len(own)
            out.append(config.combine_predictions(preds, own, r.latents, t, r.req, 0))
        return out

    def _finish(self, r: Row):
        """A request whose last step ran: the rest of its stages (decoding) alone; its Request or its error."""
        req = r.req
        req.latents, req.condition = r.latents, None
        req.stages_done = self.at + 1
        try:
            req = self.pipeline.forward(req)
        except Exception as exc:
            return exc
        ignored.say_unread([req.params], req.params_read)
        ignored.learn(self.pipeline.for_request(req), req)  # what it left unread, for a server's next arrivals
        return req

