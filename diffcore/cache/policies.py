"""The built-in step-cache policies: first-block cache (FBCache) and TeaCache.

Both keep, per CFG branch, the residual that the skipped blocks added the last time they ran, and
replay it while a cheap signal says the input has not moved much. ``threshold=0`` never skips.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import CacheState, StepCache, state_rel_l1


class FirstBlockCache(StepCache):
    """Run the first block every step; if its residual changed by less than ``threshold`` (relative
    L1) since the last full call, reuse that call's residual for all remaining blocks.

    The signal costs one block per step but tracks the model's actual response to the input (the
    first-block cache of ParaAttention / xDiT). Typical thresholds: 0.05 (safe) to 0.2 (fast).
    """

    warmup = 0  # steps that always run in full
    keep_history = False  # also keep the full call before the last one (extrapolating subclasses)

    def step(self, model, step: int, branch: str, inputs: dict) -> torch.Tensor:
        state = model.cache_embed(**inputs)
        slot = self.slot(model, branch)
        before = state.hidden
        state = model.cache_blocks(state, 0, 1)
        probe = state.hidden - before
        if (step >= self.warmup and slot.probe is not None and slot.residual is not None
                and slot.residual.shape == state.hidden.shape and state_rel_l1(state, probe, slot.probe) < self.threshold):
            return self._skip_at(model, state, slot, step)
        slot.probe = probe
        if self.keep_history:
            slot.prev_residual, slot.prev_step = slot.residual, slot.step
        slot.step = step
        return self._run(model, state, 1, slot)

    def _skip_at(self, model, state: CacheState, slot, step: int) -> torch.Tensor:
        return self._skip(model, state, slot)


class TaylorFirstBlockCache(FirstBlockCache):
    """FBCache whose skipped calls extrapolate the cached residual to first order in the step index
    (the TaylorSeer idea cache-dit offers with its DBCache), and which never skips the first
    ``warmup`` steps, where consecutive inputs differ most (cache-dit's ``max_warmup_steps``).

    Same signal and threshold as FBCache; the extrapolation ``r + (r - r_prev) * (t - t_r) / (t_r - t_prev)``
    uses the residuals of the last two full calls. Measured on Wan-medium (benchmarks/README.md) it is
    not better than plain FBCache at the same skips (51.1 vs 54.4 dB): kept as an option and a hook example.
    """

    warmup = 2
    keep_history = True

    def _skip_at(self, model, state: CacheState, slot, step: int) -> torch.Tensor:
        self.stats["skipped"] += 1
        residual = slot.residual
        if slot.prev_residual is not None and slot.step > slot.prev_step >= 0:
            residual = residual + (residual - slot.prev_residual) * ((step - slot.step) / (slot.step - slot.prev_step))
        state.hidden = state.hidden + residual
        return model.cache_tail(state)


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
            slot.accumulated += self._rescale(state_rel_l1(state, probe, slot.probe), model)
            skip = slot.accumulated < self.threshold
        slot.probe = probe
        if skip:
            return self._skip(model, state, slot)
        slot.accumulated = 0.0
        return self._run(model, state, 0, slot)
