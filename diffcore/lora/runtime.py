"""The unfused LoRA side path: which adapters are active (a contextvar) and the low-rank product.

Why a contextvar: the selection is per request, and requests run concurrently in threads on one
pipeline. The pipeline sets it around its forward (``lora_scope``); every ``diffcore.models.linear``
layer an adapter targets reads it, so switching adapters between requests costs no weight copy and
two threads with different selections never see each other's. No selection: no extra work.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F

Selection = tuple[tuple[str, float], ...]

_ACTIVE: ContextVar[Selection] = ContextVar("diffcore_active_loras", default=())


@contextlib.contextmanager
def lora_scope(selection: Optional[Mapping[str, float]]) -> Iterator[None]:
    """Run the block with ``{adapter name: weight}`` active (``None`` / ``{}``: the base model)."""
    token = _ACTIVE.set(tuple((name, float(w)) for name, w in (selection or {}).items() if w != 0.0))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_selection() -> Selection:
    return _ACTIVE.get()


def lora_delta(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``sum_a w_a * (scale * up(down(x)) [+ bias terms] + diff x)`` over the active adapters ``layer`` holds;
    ``None`` when none applies. Matches PEFT's ``lora_B(lora_A(x)) * scaling`` per adapter."""
    selection = _ACTIVE.get()
    if not selection:
        return None
    held = layer.lora_layers
    out = None
    for name, weight in selection:
        lw = held.get(name)
        if lw is None:
            continue
        term = None
        if lw.down is not None:
            term = F.linear(F.linear(x, lw.down), lw.up, lw.up_bias) * (lw.scale * weight)
        if lw.diff is not None or lw.diff_b is not None:  # full deltas (broadcast when only a bias)
            full = (F.linear(x, lw.diff, lw.diff_b) if lw.diff is not None else lw.diff_b) * weight
            term = full if term is None else term + full
        out = term if out is None else out + term
    return out
