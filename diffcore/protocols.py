"""What the engine and the server expect of the objects they are handed, named as ``typing.Protocol``s.

Why: these used to be probed by attribute name (``getattr(generator, "make_runner", None)``,
``all(hasattr(model, name) for name in PROTOCOL)``); a protocol says the whole contract in one place, a
type checker can check it, and ``isinstance`` works on it (all are ``runtime_checkable``, which checks
that the members exist, not their signatures).

* ``ServedModel``: what a server (routes, the batching scheduler, video jobs) uses of its model: a
  ``DiffGenerator``, or the torchrun ``Leader`` (diffcore.serve.distributed) whose calls run on every rank.
* ``BlockCacheModel``: a denoiser a step cache can split into embed / blocks / tail (diffcore.cache.base).
* ``CausalModel``: a denoiser the block-causal stage can run block by block over a KV cache
  (diffcore.stages.causal).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: this module imports nothing of the engine at run time
    import torch

    from .cache.base import CacheState
    from .configs.pipeline_config import PipelineConfig
    from .engine.batching import BatchScheduler
    from .outputs import GenerationResult
    from .request import Request


@runtime_checkable
class ServedModel(Protocol):
    """A loaded model as a server uses it. Reads go to the model; ``request`` makes a validated Request
    (diffcore.engine.intake); ``run_requests`` runs a batch of them; adapter changes reach every copy."""

    model: str  # the name it was loaded with
    sampling_params_cls: type
    broken: Optional[str]  # why it can run nothing more (torchrun ranks out of step); None while it can
    stops_at_steps: bool  # a running request can stop at a step boundary (False: its batch runs to its end)

    @property
    def config(self) -> "PipelineConfig": ...

    @property
    def pipeline(self) -> Any: ...

    @property
    def loras(self) -> dict: ...

    @property
    def streams_blocks(self) -> bool: ...  # hands out finished video blocks (WebSocket /v1/realtime/video)

    @property
    def can_preview(self) -> bool: ...  # streamed previews (stream=true, partial_images)

    def request(self, kwargs: dict, check_loras: bool = False) -> "Request": ...

    def params_class(self, kwargs: dict) -> type: ...

    def run_requests(self, reqs: list["Request"], starting: Optional[Callable] = None) -> list: ...

    def generate_batch(self, requests: list[dict]) -> list["GenerationResult"]: ...

    def make_runner(self, max_batch_size: int = 8, max_wait_ms: float = 20.0,
                    max_queue: int = 64, step_batching: bool = True) -> "BatchScheduler": ...

    def load_lora(self, source, name: Optional[str] = None, weight_name: Optional[str] = None, *,
                  component: str = "transformer", ignore_text_encoder: bool = False) -> str: ...

    def unload_lora(self, name: str) -> None: ...

    def fuse_lora(self, loras: dict) -> None: ...

    def unfuse_lora(self) -> None: ...


@runtime_checkable
class BlockCacheModel(Protocol):
    """The block-cache protocol (diffcore.cache.base explains it): ``forward`` must equal
    ``cache_tail(cache_blocks(cache_embed(...), 0, cache_num_blocks))`` exactly. Optional extras a policy
    uses when present: ``cache_probe(state)`` and ``teacache_coefficients`` (TeaCache)."""

    cache_num_blocks: int

    def cache_embed(self, hidden_states: "torch.Tensor", timestep: "torch.Tensor", **kwargs) -> "CacheState": ...

    def cache_blocks(self, state: "CacheState", start: int, stop: int) -> "CacheState": ...

    def cache_tail(self, state: "CacheState") -> "torch.Tensor": ...


@runtime_checkable
class CausalModel(Protocol):
    """A block-causal denoiser: a fresh per-request KV cache, and a forward over one block of latent frames
    starting at video frame ``start_frame`` that reads (and, at the context timestep, writes) the cache."""

    def new_kv_cache(self, latent_shape: tuple, window: int = -1, sink: int = 0) -> Any: ...

    def forward(self, hidden_states: "torch.Tensor", timestep: "torch.Tensor", *, kv_cache: Any,
                start_frame: int, **kwargs) -> "torch.Tensor": ...
