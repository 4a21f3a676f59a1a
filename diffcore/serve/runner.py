"""The one object the routes hand work to: the engine's BatchScheduler, or the runner a generator spread over
ranks brings (serve.distributed). Both offer ``submit(kwargs, on_step) -> Future``, ``cancel(future)``,
``queue_depth``, ``on_batch`` and ``shutdown(wait)``; the routes never know which one runs.
"""
from __future__ import annotations


def make_runner(generator, max_batch_size: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64):
    own = getattr(generator, "make_runner", None)  # a generator spread over ranks (serve.distributed) brings its own
    if own is not None:
        return own(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue)
    from ..engine.batching import BatchScheduler

    return BatchScheduler(generator, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue)
