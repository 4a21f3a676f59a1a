"""The per-step guidance policy: which rows run the unconditional branch at a step, and their combination.

A request that runs CFG (``req.do_cfg``) asks its config, at every step and for every row, whether that row
still needs the unconditional prediction (``PipelineConfig.guidance_active``: Z-Image's ``cfg_truncation``,
"CFG only in the first k steps"). Rows that do not are left with their conditional prediction, and the
unconditional call is made only for the rows that do, when the config can select rows of its condition
(``PipelineConfig.condition_rows``); otherwise it runs for the whole batch and the other rows' results are
dropped. Either way every row gets what it would get alone.
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from ..request import Request

_ROW_TENSORS = ("latents", "image_latents", "image_embeds")  # batch-first fields a row view narrows


def guided_rows(config, req: Request, step: int, t: torch.Tensor) -> list[int]:
    """Indices of the rows that run the unconditional branch at ``step`` (none unless ``req.do_cfg``; in a batch
    mixing rows with and without CFG, only those the config wants it for)."""
    if not req.do_cfg:
        return []
    rows = req.row_params if req.row_params is not None else [req.params] * req.batch_size
    return [i for i, p in enumerate(rows) if config.wants_cfg(p) and config.guidance_active(p, step, t)]


def row_view(req: Request, rows: list[int]) -> Request:
    """A shallow Request of only ``rows``: per-row parameters, prompts and batch-first tensors narrowed, so
    config hooks (``combine_guidance``, ``guidance_scale_at``, ``model_input``) see just those rows."""
    if len(rows) == req.batch_size:
        return req
    all_params = req.row_params if req.row_params is not None else [req.params] * req.batch_size
    changes = dict(batch_size=len(rows), row_params=[all_params[i] for i in rows],
                   prompts=[req.prompts[i] for i in rows] if len(req.prompts) == req.batch_size else req.prompts)
    index = torch.tensor(rows, dtype=torch.long)
    for name in _ROW_TENSORS:
        value = getattr(req, name)
        if isinstance(value, torch.Tensor) and value.shape[0] == req.batch_size:
            changes[name] = value[index.to(value.device)]
    return attrs.evolve(req, **changes)


def take_rows(x: torch.Tensor, rows: list[int], batch_size: int) -> torch.Tensor:
    return x if len(rows) == batch_size else x[torch.tensor(rows, dtype=torch.long, device=x.device)]


def combine_rows(config, cond: torch.Tensor, uncond: torch.Tensor, rows: list[int], t, req: Request,
                 expert: int) -> torch.Tensor:
    """``cond`` with ``rows`` replaced by the config's combination of their two branches (``uncond`` holds
    only those rows)."""
    view = row_view(req, rows)
    mixed = config.combine_guidance(take_rows(cond, rows, req.batch_size), uncond,
                                    config.guidance_scale_at(t, view, expert), view)
    if len(rows) == req.batch_size:
        return mixed
    out = cond.clone()
    out[torch.tensor(rows, dtype=torch.long, device=cond.device)] = mixed.to(out.dtype)
    return out


def uncond_kwargs_for(config, kwargs: dict, rows: list[int], req: Request) -> Optional[dict]:
    """The unconditional condition narrowed to ``rows``: the kwargs themselves for the whole batch, the
    config's selection for a subset, or None when the config cannot select rows (run the whole batch)."""
    if len(rows) == req.batch_size:
        return kwargs
    return config.condition_rows(kwargs, rows, req)
