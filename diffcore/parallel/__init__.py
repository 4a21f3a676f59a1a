"""Scale-out inside one generation: Ulysses sequence parallelism and CFG parallelism over torch.distributed.

* ``groups``: the layout check (before any weights load), the process groups a pipeline owns, and the
  contextvar (``CURRENT``, set by the pipeline's EngineContext) that makes them visible to the
  attention dispatch and the denoising loop during ``pipeline.forward``.
* ``ulysses``: ``SeqShard`` (how a model splits its token sequence over the sequence-parallel ranks)
  and the all-to-all wrapped around the attention call.

Launch with torchrun; see docs/scale.md.
"""
from .groups import CURRENT, ParallelGroups, check_parallel, current, launched_world_size
from .ulysses import SeqShard, sequence_shard, ulysses_attention

__all__ = ["CURRENT", "ParallelGroups", "SeqShard", "check_parallel", "current", "launched_world_size",
           "sequence_shard", "ulysses_attention"]
