"""The built-in step-cache policies: first-block cache (FBCache) and TeaCache.

Both keep, per CFG branch, the residual that the skipped blocks added the last time they ran, and
replay it while a cheap signal says the input has not moved much. ``threshold=0`` never skips.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import StepCache, rel_l1


class FirstBlockCache(StepCache):
    """Run the first block every step; if its residual changed by less than ``threshold`` (relative
    L1) since the last full call, reuse that call's residual for all remaining blocks.

    The signal costs one block per step but tracks the model's actual response to the input (the
    first-block cache of ParaAttention / xDiT). Typical thresholds: 0.05 (safe) to 0.2 (fast).
    """

    def step(self, model, step: int, branch: str, inputs: dict) -> torch.Tensor:
        state = model.cache_embed(**inputs)
        slot = self.slot(model, branch)
        before = state.hidden
        state = model.cache_blocks(state, 0, 1)
        probe = state.hidden - before
        if (slot.probe is not None and slot.residual is not None and slot.residual.shape == state.hidden.shape
                and rel_l1(probe, slot.probe) < self.threshold):
            return self._skip(model, state, slot)
        slot.probe = probe
        return self._run(model, state, 1, slot)


class TeaCache(StepCache):
    """Skip whole calls while the accumulated relative change of the first block's timestep-modulated
    input (``model.cache_probe``) stays below ``threshold``; the first and last steps always run.

    The change is mapped through ``coefficients`` (or the model's ``teacache_coefficients``), a
    polynomial fitted per model family that predicts the output change; without one the raw change
    is used. Cheaper signal than FBCache (no block runs on a skipped step), but a fitted polynomial
    matters for real checkpoints.
    """

    def __init__(self, threshold: float = 0.1, coefficients: Optional[Sequence[float]] = None):
        super().__init__(threshold)
        self.coefficients = coefficients

    def _rescale(self, value: float, model) -> float:
        coeffs = self.coefficients or getattr(model, "teacache_coefficients", None)
        if not coeffs:
            return value
        out = 0.0
        for c in coeffs:  # Horner, highest power first (numpy.poly1d order)
            out = out * value + c
        return out

    def step(self, model, step: int, branch: str, inputs: dict) -> torch.Tensor:
        state = model.cache_embed(**inputs)
        slot = self.slot(model, branch)
        probe = model.cache_probe(state) if hasattr(model, "cache_probe") else state.hidden
        last = self.num_steps is not None and step >= self.num_steps - 1
        skip = False
        if slot.probe is not None and slot.residual is not None and not last and slot.residual.shape == state.hidden.shape:
            slot.accumulated += self._rescale(rel_l1(probe, slot.probe), model)
            skip = slot.accumulated < self.threshold
        slot.probe = probe
        if skip:
            return self._skip(model, state, slot)
        slot.accumulated = 0.0
        return self._run(model, state, 0, slot)
