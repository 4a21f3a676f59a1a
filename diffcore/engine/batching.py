"""Running many requests together: ``run_batch`` (one call, grouped by compatibility) and
``BatchScheduler`` (a queue that many threads submit to; it forms batches and hands back results).

A group of compatible requests (equal ``rows.batch_key``) runs as one Request with rows through the
pipeline's ``"rows"`` stages: one text-encoder call, one transformer call per step and branch, one
VAE decode for all of them. Every request keeps its own noise (its own generator), prompts and
per-row guidance, so its result equals its solo run. Requests that fail on their own (bad
parameters, an unreadable image) fail alone; the others complete.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from .. import ignored
from ..errors import EngineShutdownError, QueueFullError
from ..request import Request
from . import rows

log = logging.getLogger(__name__)


def batch_plan(pipeline) -> Optional[int]:
    """Index of the first stage that runs over merged rows, or None when the pipeline cannot batch (a stage
    without a batch mode, or a per-request stage that reads what a merged stage produced)."""
    stages = pipeline.stages
    if not stages or any(s.batch not in ("rows", "each") for s in stages):
        return None
    first = next((i for i, s in enumerate(stages) if s.batch == "rows"), None)
    if first is None:
        return None
    merged = set()
    for stage in stages[first:]:
        if stage.batch == "rows":
            merged.update(f.name for f in stage.outputs)
        elif any(f.name in merged for f in stage.inputs):
            return None
    return first


def run_batch(gen, requests: list[Request], starting=None) -> list:
    """Run Requests together where they are compatible; returns, in order, a GenerationResult or the
    exception that request failed with (None for one that ``starting`` dropped). ``starting(indices)``
    (optional) is asked just before each group runs which of its requests still want to: a request
    cancelled while an earlier group ran is left out."""
    chosen = [gen.pipeline.for_request(r) for r in requests]  # the composition (task) each request asks for
    if any(c is not chosen[0] for c in chosen):
        return _by_composition(gen, requests, chosen, starting)
    pipeline = chosen[0]
    start = time.perf_counter()
    first = batch_plan(pipeline)
    if first is None or len(requests) == 1:
        out = []
        for i, r in enumerate(requests):
            out.append(_solo(gen, r) if starting is None or starting([i])[0] else None)
        return out
    errors: dict[int, BaseException] = {}
    live = {}
    for i, req in enumerate(requests):  # alone, up to where rows merge (sizes and CFG are known then)
        try:
            with pipeline.running(req):
                for stage in pipeline.stages[:first]:
                    req = stage(req)
            live[i] = req
        except Exception as exc:  # this request fails alone
            errors[i] = exc
    groups: dict[Any, list[int]] = {}
    for i, req in live.items():
        groups.setdefault(rows.batch_key(pipeline, req), []).append(i)
    for indices in groups.values():
        if starting is not None:
            keep = starting(indices)
            dropped = [i for i, k in zip(indices, keep) if not k]
            for i in dropped:
                errors[i] = None
            indices = [i for i, k in zip(indices, keep) if k]
            if not indices:
                continue
        parts = [live[i] for i in indices]
        try:
            _run_group(pipeline, pipeline.stages[first:], parts)
        except Exception as exc:  # the group's shared work failed: every request in it fails
            for i in indices:
                errors[i] = exc
    out = []
    for i, req in enumerate(requests):
        if i in errors:
            out.append(errors[i])
        else:
            req.timings["total"] = time.perf_counter() - start
            out.append(gen.result(req))
    return out


def _by_composition(gen, requests: list[Request], chosen: list, starting) -> list:
    """Requests for different compositions (text-to-image, img2img, inpaint) never share rows: each
    composition's requests run as their own batch."""
    out: list = [None] * len(requests)
    for comp in {id(c): c for c in chosen}.values():
        idx = [i for i, c in enumerate(chosen) if c is comp]
        sub_starting = None if starting is None else (lambda ids, idx=idx: starting([idx[j] for j in ids]))
        for i, result in zip(idx, run_batch(gen, [requests[i] for i in idx], sub_starting)):
            out[i] = result
    return out


def _run_group(pipeline, stages, parts: list[Request]) -> None:
    if len(parts) == 1:
        req = parts[0]
        with pipeline.running(req):
            for stage in stages:
                req = stage(req)
        return
    batch = rows.merge(parts)
    with pipeline.running(batch):  # LoRA selections per row (the batch's row_params)
        for stage in stages:
            if stage.batch == "rows":
                batch = stage(batch)
            else:
                for part in parts:
                    stage(part)
                rows.merge_outputs(batch, parts, [f.name for f in stage.outputs])
    rows.split(batch, parts)


def _solo(gen, req: Request):
    try:
        start = time.perf_counter()
        with ignored.tracking([req.params]):  # the ignored-parameter rule, as generate() applies it
            req = gen.pipeline.forward(req)
        req.timings["total"] = time.perf_counter() - start
        return gen.result(req)
    except Exception as exc:
        return exc


class _Item:
    __slots__ = ("kwargs", "future", "on_step")

    def __init__(self, kwargs: dict, future: concurrent.futures.Future, on_step):
        self.kwargs, self.future, self.on_step = kwargs, future, on_step


class BatchScheduler:
    """Accepts requests from many threads, runs them in batches on one DiffGenerator, one batch at a time.

    A batch starts when ``max_batch_size`` requests wait or the oldest has waited ``max_wait_ms``.
    ``submit`` returns a Future of the request's GenerationResult; a request with bad parameters gets
    its own SamplingParamError on its future while the rest of its batch completes. ``on_batch``
    (optional, settable) is called with each batch's size, for metrics.
    """

    def __init__(self, generator, max_batch_size: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.generator = generator
        self.max_batch_size, self.max_wait_ms, self.max_queue = max_batch_size, float(max_wait_ms), max_queue
        self.on_batch: Optional[Callable[[int], None]] = None
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0
        self._worker = threading.Thread(target=self._loop, name="diffcore-batch-scheduler", daemon=True)
        self._worker.start()

    # -- callers ---------------------------------------------------------------------------
    def submit(self, kwargs: dict, on_step: Optional[Callable[[int, int], None]] = None) -> concurrent.futures.Future:
        """Queue one generate() call (its keyword arguments). ``on_step(step, num_steps)`` reports progress
        after every denoising step (step counts from 1)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise EngineShutdownError()
            if self._depth() >= self.max_queue:
                raise QueueFullError(self.max_queue)
            self._queue.append(_Item(dict(kwargs), future, on_step))
            self._cond.notify_all()
        return future

    def cancel(self, future: concurrent.futures.Future) -> bool:
        """Drop a request that has not started; False once it runs (or ran)."""
        with self._cond:
            if not future.cancel():
                return False
            self._queue = deque(item for item in self._queue if item.future is not future)
            return True

    @property
    def queue_depth(self) -> int:
        """Requests in the engine: waiting to start or running (``max_queue`` limits the waiting ones)."""
        with self._cond:
            return self._depth() + self._running

    def shutdown(self, wait: bool = True) -> None:
        """Accept nothing new; what is queued or running still completes. ``wait``: until it has."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self) -> "BatchScheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=True)

    # -- the worker ------------------------------------------------------------------------
    def _depth(self) -> int:
        return sum(1 for item in self._queue if not item.future.cancelled())

    def _next_batch(self) -> Optional[list[_Item]]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = time.monotonic() + self.max_wait_ms / 1000
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue.popleft()
                if not item.future.cancelled():  # marked running only when its group starts (run_batch)
                    batch.append(item)
            self._running = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                try:
                    self._execute(batch)
                finally:
                    with self._cond:
                        self._running = 0

    def _execute(self, batch: list[_Item]) -> None:
        gen = self.generator
        reqs, items = [], []
        for item in batch:
            try:
                kwargs = dict(item.kwargs)
                callback = kwargs.pop("callback", None)
                params = gen.params_from(kwargs)
                reqs.append(gen.new_request(params, callback=_progress(callback, item.on_step,
                                                                       params.num_inference_steps)))
                items.append(item)
            except Exception as exc:  # bad parameters: this request fails alone
                item.future.set_exception(exc)
        if not reqs:
            return
        if self.on_batch is not None:
            try:
                self.on_batch(len(reqs))
            except Exception:  # metrics must not break serving
                log.exception("on_batch callback failed")
        try:
            outcomes = self._run(reqs, items)
        except BaseException as exc:  # nothing of the batch can complete
            outcomes = [exc if items[i].future.running() else None for i in range(len(reqs))]
        for item, outcome in zip(items, outcomes):
            if outcome is None or item.future.cancelled():
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)


    def _run(self, reqs: list[Request], items: list[_Item]) -> list:
        """``run_batch`` over the batch; each request is marked running as its group starts. (The rank-0
        side of a parallel server, diffcore.serve.distributed, overrides this to run it on every rank.)"""
        def starting(indices):  # False: cancelled while an earlier group of the batch ran
            return [items[i].future.set_running_or_notify_cancel() for i in indices]

        return run_batch(self.generator, reqs, starting)


def _progress(user, on_step, num_steps: int):
    """The request's step callback: its own ``callback`` (if any), then ``on_step(step, num_steps)``."""
    if user is None and on_step is None:
        return None

    def callback(step, t, latents):
        if user is not None:
            user(step, t, latents)
        if on_step is not None:
            on_step(step + 1, num_steps)

    return callback
