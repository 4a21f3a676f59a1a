"""Step caches: skip most of a transformer call when its input barely changed since the last full one.

The DenoisingStage calls a policy instead of the model, as
``policy(model, step, branch, hidden_states=x, timestep=t, **kwargs)``, and calls
``policy.reset(num_steps)`` at the start of every request. A policy needs the model split into
stages, so a model opts in by implementing the **block-cache protocol**:

* ``cache_embed(hidden_states, timestep, **kwargs) -> CacheState``: input embeddings and per-call
  conditioning (everything before the first block). ``state.hidden`` is the stream whose residual
  is cached (the image/video tokens); model-private tensors go in ``state.extra``.
* ``cache_num_blocks`` (int) and ``cache_blocks(state, start, stop) -> CacheState``: run blocks
  ``[start, stop)`` (a model with several block kinds numbers them in execution order).
* ``cache_tail(state) -> Tensor``: final norm and projection; returns what ``forward`` returns.
* optional ``cache_probe(state) -> Tensor``: the first block's timestep-modulated input, the cheap
  signal TeaCache watches; and ``teacache_coefficients``: a polynomial (highest power first) that
  maps its relative change to the expected output change, fitted per model family.

``forward`` must equal ``cache_tail(cache_blocks(cache_embed(...), 0, cache_num_blocks))`` exactly
(the FLUX transformer implements ``forward`` that way), so a policy that never skips reproduces
the uncached output bit for bit.
"""
from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)

# What makes one fresh step cache (a request's own), set by the pipeline around its forward from its
# ``cache_policy``; None: no step cache. The denoising loops read it (``DenoisingLoopStage.start_step_cache``).
FACTORY: contextvars.ContextVar[Optional[Callable[[], Any]]] = contextvars.ContextVar("diffcore_step_cache",
                                                                                     default=None)


@dataclass
class CacheState:
    """What flows between the protocol's stages: the cached stream plus model-private tensors."""

    hidden: torch.Tensor
    extra: dict = field(default_factory=dict)
    shard: Any = None  # diffcore.parallel.SeqShard when the model runs sequence-parallel: hidden is one shard


def state_rel_l1(state: CacheState, now: torch.Tensor, before: torch.Tensor) -> float:
    """``rel_l1`` over the whole sequence; under sequence parallelism reduced over every shard, so all
    ranks take the same skip decision."""
    return rel_l1(now, before) if state.shard is None else state.shard.rel_l1(now, before)


def supports_step_cache(model: Any) -> bool:
    """Whether ``model`` implements the block-cache protocol (``diffcore.protocols.BlockCacheModel``)."""
    from ..protocols import BlockCacheModel

    return isinstance(model, BlockCacheModel)


def rel_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """Mean absolute change relative to the mean magnitude (the distance FBCache and TeaCache use)."""
    return float((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12))


@dataclass
class _Slot:
    """Per (model, branch) memory: CFG's two branches and two-expert models never share a cache."""

    probe: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    accumulated: float = 0.0
    # the residual of the full call before the last one and the steps of both (first-order extrapolation)
    prev_residual: Optional[torch.Tensor] = None
    step: int = -1
    prev_step: int = -1


class StepCache:
    """Base class: per-branch slots, counters, and the fallback for models without the protocol.

    ``stats`` counts transformer calls ``computed`` in full and ``skipped`` (body replaced by the
    cached residual) since the last ``reset``.
    """

    def __init__(self, threshold: float = 0.1):
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.num_steps: Optional[int] = None
        self._slots: dict[tuple[int, str], _Slot] = {}
        self.stats = {"computed": 0, "skipped": 0}
        self._warned: set[str] = set()

    def reset(self, num_steps: Optional[int] = None) -> None:
        self.num_steps = num_steps
        self._slots.clear()
        self.stats = {"computed": 0, "skipped": 0}

    def slot(self, model, branch: str) -> _Slot:
        return self._slots.setdefault((id(model), branch), _Slot())

    def __call__(self, model, step: int, branch: str, **inputs) -> torch.Tensor:
        if not supports_step_cache(model):
            name = type(model).__name__
            if name not in self._warned:
                self._warned.add(name)
                log.warning("%s does not implement the block-cache protocol; %s runs it uncached",
                            name, type(self).__name__)
            self.stats["computed"] += 1
            return model(**inputs)
        return self.step(model, step, branch, inputs)

    def step(self, model, step: int, branch: str, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    # helpers for subclasses ---------------------------------------------------------------
    def _skip(self, model, state: CacheState, slot: _Slot) -> torch.Tensor:
        self.stats["skipped"] += 1
        state.hidden = state.hidden + slot.residual
        return model.cache_tail(state)

    def _run(self, model, state: CacheState, start: int, slot: _Slot) -> torch.Tensor:
        self.stats["computed"] += 1
        before = state.hidden
        state = model.cache_blocks(state, start, model.cache_num_blocks)
        slot.residual = state.hidden - before
        return model.cache_tail(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"
