"""The one object the routes hand work to: the engine's BatchScheduler, or a serial stand-in without it.

Both offer ``submit(kwargs, on_step) -> Future``, ``cancel(future)``, ``queue_depth``, ``on_batch`` and
``shutdown(wait)``; the routes never know which one runs.
"""
from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from typing import Callable, Optional

from ..errors import EngineShutdownError, QueueFullError


def make_runner(generator, max_batch_size: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64):
    own = getattr(generator, "make_runner", None)  # a generator spread over ranks (serve.distributed) brings its own
    if own is not None:
        return own(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue)
    try:
        from ..engine.batching import BatchScheduler
    except ImportError:  # an engine without the batching scheduler: one request at a time
        return SerialRunner(generator, max_queue=max_queue)
    return BatchScheduler(generator, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue)


class SerialRunner:
    """One worker thread, a bounded queue, generate() per request (no batching)."""

    def __init__(self, generator, max_queue: int = 64):
        self.generator, self.max_queue = generator, max_queue
        self.on_batch: Optional[Callable[[int], None]] = None
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="diffcore-serve-worker", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        return self._pending

    def submit(self, kwargs: dict, on_step: Optional[Callable[[int, int], None]] = None) -> cf.Future:
        with self._lock:
            if self._closed:
                raise EngineShutdownError()
            if self._pending >= self.max_queue:
                raise QueueFullError(self.max_queue)
            self._pending += 1
        future: cf.Future = cf.Future()
        self._queue.put((future, dict(kwargs), on_step))
        return future

    def cancel(self, future: cf.Future) -> bool:
        return future.cancel()  # succeeds only while it waits in the queue

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
        self._queue.put(None)
        if wait:
            self._worker.join()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            future, kwargs, on_step = item
            running = future.set_running_or_notify_cancel()
            result = error = None
            if running:
                if self.on_batch is not None:
                    self.on_batch(1)
                callback = None
                if on_step is not None:
                    steps = kwargs.get("num_inference_steps") or self.generator.sampling_params_cls().num_inference_steps
                    callback = lambda i, t, latents: on_step(i + 1, steps)  # noqa: E731
                try:
                    result = self.generator.generate(**kwargs, callback=callback)
                except BaseException as exc:  # the caller's error, on its own future
                    error = exc
            with self._lock:  # before the caller hears back, so queue_depth is already right then
                self._pending -= 1
            if running:
                future.set_exception(error) if error is not None else future.set_result(result)
        # fail whatever is still queued
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[0].set_running_or_notify_cancel():
                item[0].set_exception(EngineShutdownError())
