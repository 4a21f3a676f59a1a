"""The unfused LoRA side path: which adapters are active (a contextvar) and the low-rank product.

Why a contextvar: the selection is per request, and requests run concurrently in threads on one
pipeline. The pipeline sets it around its forward (``lora_scope``); every ``diffcore.models.linear``
layer an adapter targets reads it, so switching adapters between requests costs no weight copy and
two threads with different selections never see each other's. No selection: no extra work.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Mapping, Optional, Union

import torch
import torch.nn.functional as F

Weight = Union[float, torch.Tensor]  # one weight for every row, or one per batch row (B,)
Selection = tuple[tuple[str, Weight], ...]

_ACTIVE: ContextVar[Selection] = ContextVar("diffcore_active_loras", default=())


@contextlib.contextmanager
def lora_scope(selection: Optional[Mapping[str, Weight]]) -> Iterator[None]:
    """Run the block with ``{adapter name: weight}`` active (``None`` / ``{}``: the base model).

    A weight may be a tensor with one entry per batch row: a batch whose rows come from requests
    with different adapters runs as one batch, each row with its own weights."""
    items = []
    for name, w in (selection or {}).items():
        if isinstance(w, torch.Tensor):
            if bool((w != 0).any()):
                items.append((name, w.detach().float()))
        elif w != 0.0:
            items.append((name, float(w)))
    token = _ACTIVE.set(tuple(items))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_selection() -> Selection:
    return _ACTIVE.get()


def _rows(weight: Weight, x: torch.Tensor) -> Weight:
    """A per-row weight (B,) shaped to scale ``x``'s rows; a layer may see the rows repeated (e.g. the
    conditional and unconditional branch concatenated), which repeats the weights the same way."""
    if not isinstance(weight, torch.Tensor):
        return weight
    n, b = x.shape[0], weight.shape[0]
    if n % b:
        raise ValueError(f"per-row LoRA weights for {b} rows cannot scale an input of {n} rows")
    w = weight.repeat(n // b) if n != b else weight
    return w.to(device=x.device, dtype=x.dtype).view(n, *([1] * (x.ndim - 1)))


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
        weight = _rows(weight, x)
        term = None
        if lw.down is not None:
            term = F.linear(F.linear(x, lw.down), lw.up, lw.up_bias) * (lw.scale * weight)
        if lw.diff is not None or lw.diff_b is not None:  # full deltas (broadcast when only a bias)
            full = (F.linear(x, lw.diff, lw.diff_b) if lw.diff is not None else lw.diff_b) * weight
            term = full if term is None else term + full
        out = term if out is None else out + term
    return out
