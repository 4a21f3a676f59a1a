"""A batch is a Request with rows: stack compatible Requests into one, run the stages, split the result.

Each stage says how it takes part in a batch (``PipelineStage.batch``):

* ``"rows"``: it runs once over the merged Request, whatever user each row came from (text
  encoding, conditioning, denoising, decoding);
* ``"each"``: it runs on every request alone and its outputs are merged into the batch (input
  validation, image encoding, latent noise from each request's own generator, timesteps);
* ``None`` (the default of a stage that does not say): the pipeline does not batch; its requests
  run one at a time.

How a field is merged follows ``MERGE``: ``"same"`` fields are equal in every request of a batch
(the batch key guarantees it; the first request's value is kept), tensors are concatenated on
the batch axis, prompt embeddings are right-padded to the longest sequence with a mask. Per-row
sampling parameters stay reachable through ``Request.row_params`` / ``Request.per_row``.
"""
from __future__ import annotations

from typing import Callable, Optional

import attrs
import torch

from ..errors import RequestCancelledError
from ..request import PromptEmbeds, Request

# Fields every request of a batch shares (the batch key includes what decides them).
SAME = ("params", "device", "generator", "height", "width", "num_frames", "do_cfg", "images", "timesteps",
        "scheduler", "extra")
CONCAT = ("prompts", "negative_prompts", "latents", "image_latents", "image_embeds")
EMBEDS = ("prompt_embeds", "negative_prompt_embeds")
# Fields a batch sets for itself when it is formed (or that never carry over from its parts).
_OWN = ("params", "prompts", "batch_size", "device", "generator", "row_params", "callback", "block_callback",
        "x0_callback", "timings", "step_cache", "condition", "output", "audio", "audio_sample_rate", "extra",
        "stages_done", "notices", "params_read")


def batch_key(pipeline, req: Request) -> tuple:
    """Requests with equal keys can share transformer calls. Built after input validation; extend it here
    (engine-wide per-request choices) or per family with ``PipelineConfig.batch_key``.

    The LoRA selection is not part of it: requests with different adapters (or none) share a batch, each
    row scaled by its own weights (``LoraManager.request_selection`` gives per-row weight tensors)."""
    if req.step_cache is not None or pipeline.cache_policy is not None:
        return ("alone", id(req))  # a step cache decides per call whether to skip: its rows cannot be shared
    cfg = None if pipeline.config.mixed_cfg_batches else req.do_cfg  # see merge_cfg
    return share_key(pipeline, req, cfg) + schedule_key(req)


def share_key(pipeline, req: Request, cfg) -> tuple:
    """What the rows of one transformer call must share (sizes, CFG ``cfg``, sequence length, task, the
    config's own key); the schedule (``schedule_key``) may differ where rows step on their own
    (diffcore.engine.stepping)."""
    p = req.params
    return (req.height, req.width, req.num_frames, cfg, p.max_sequence_length, p.output_type == "latent",
            len(req.images or ()), getattr(type(p), "task", None), req.extra.get("paste_size"),
            pipeline.config.batch_key(req))


def schedule_key(req: Request) -> tuple:
    """What decides a request's timesteps: equal in a batch whose rows share one scheduler."""
    p = req.params
    return (p.num_inference_steps, _hashable(p.timesteps), p.flow_shift, getattr(p, "strength", None))


def _hashable(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def pad_embeds(parts: list[Optional[PromptEmbeds]]) -> Optional[PromptEmbeds]:
    """Concatenate prompt embeddings on the batch axis, right-padding shorter sequences with zeros and a mask."""
    if all(p is None for p in parts):
        return None
    n = max(p.embeds.shape[1] for p in parts)
    padded = any(p.embeds.shape[1] != n for p in parts)
    embeds, masks = [], []
    for p in parts:
        pad = n - p.embeds.shape[1]
        embeds.append(torch.nn.functional.pad(p.embeds, (0, 0, 0, pad)) if pad else p.embeds)
        if padded or p.mask is not None:
            mask = p.mask if p.mask is not None else torch.ones(p.embeds.shape[:2], dtype=torch.long,
                                                                 device=p.embeds.device)
            masks.append(torch.nn.functional.pad(mask, (0, pad)) if pad else mask)
    pooled = [p.pooled for p in parts]
    return PromptEmbeds(embeds=torch.cat(embeds), mask=torch.cat(masks) if masks else None,
                        pooled=torch.cat(pooled) if all(x is not None for x in pooled) else None)


def merge_field(name: str, values: list):
    if name in EMBEDS:
        return pad_embeds(values)
    if name in SAME:
        return values[0]
    if all(v is None for v in values):
        return None
    if name in CONCAT or all(isinstance(v, torch.Tensor) for v in values):
        if isinstance(values[0], list):
            return [x for v in values for x in v]
        return torch.cat(values)
    return values[0]


def merge(parts: list[Request]) -> Request:
    """One Request whose rows are the rows of ``parts`` (validated requests with equal batch keys)."""
    first = parts[0]
    batch = Request(params=first.params, prompts=[p for r in parts for p in r.prompts],
                    batch_size=sum(r.batch_size for r in parts), device=first.device, generator=first.generator,
                    row_params=[p for r in parts for p in (r.row_params or [r.params] * r.batch_size)])
    mixed = any(r.do_cfg for r in parts) and not all(r.do_cfg for r in parts)
    for field in attrs.fields(Request):  # what the per-request stages before the merge produced
        if field.name not in _OWN and not (mixed and field.name in ("do_cfg", "negative_prompts")):
            setattr(batch, field.name, merge_field(field.name, [getattr(r, field.name) for r in parts]))
    batch.callback, batch.x0_callback = _fan_out(parts)
    if mixed:
        merge_cfg(batch, parts)
    batch.stages_done = first.stages_done  # its parts ran alone up to the same stage
    return batch


def merge_cfg(batch: Request, parts: list[Request]) -> None:
    """Rows with and without CFG in one batch (configs with ``mixed_cfg_batches``): the batch runs CFG, the
    rows without it get an empty negative prompt to fill the unconditional batch, and the per-step guidance
    policy (``stages/guidance.py``, ``PipelineConfig.wants_cfg`` per row) never guides them."""
    batch.do_cfg = True
    batch.negative_prompts = [n for r in parts for n in (r.negative_prompts if r.do_cfg else [""] * r.batch_size)]


def merge_outputs(batch: Request, parts: list[Request], names) -> None:
    """After an ``"each"`` stage ran on every part: its outputs, merged into ``batch``."""
    for name in names:
        setattr(batch, name, merge_field(name, [getattr(r, name) for r in parts]))


def _fan_out(parts: list[Request]) -> tuple[Optional[Callable], Optional[Callable]]:
    """The batch's step callback and x0 callback: each request's own, with its own rows of the latents (of the
    predicted clean latents). A request cancelled at a step (its callback raised ``RequestCancelledError``) hears
    no more; once every request of the batch is, the batch stops there."""
    spans = row_spans(parts)
    stopped: set[int] = set()

    def callback(step, t, latents):
        for k, (r, (a, b)) in enumerate(zip(parts, spans)):
            if r.callback is not None and k not in stopped:
                try:
                    r.callback(step, t, latents[a:b])
                except RequestCancelledError:
                    stopped.add(k)
        if len(stopped) == len(parts):
            raise RequestCancelledError(step + 1)

    def x0_callback(step, num_steps, x0):
        for k, (r, (a, b)) in enumerate(zip(parts, spans)):
            if r.x0_callback is not None and k not in stopped:
                r.x0_callback(step, num_steps, x0[a:b])

    return (None if all(r.callback is None for r in parts) else callback,
            None if all(r.x0_callback is None for r in parts) else x0_callback)


def row_spans(parts: list[Request]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for r in parts:
        spans.append((start, start + r.batch_size))
        start += r.batch_size
    return spans


def split(batch: Request, parts: list[Request]) -> None:
    """Hand every part its own rows of the batch's latents and output, and the batch's timings."""
    for r, (a, b) in zip(parts, row_spans(parts)):
        r.latents = batch.latents[a:b] if batch.latents is not None else None
        r.output = batch.output[a:b] if batch.output is not None else None
        r.audio = batch.audio[a:b] if batch.audio is not None else None
        r.audio_sample_rate = batch.audio_sample_rate
        r.timings.update(batch.timings)
