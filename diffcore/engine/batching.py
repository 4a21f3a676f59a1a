"""Running many requests together: ``run_batch`` (validated Requests through one pipeline's stage loop,
grouped by compatibility) and ``BatchScheduler`` (a queue that many threads submit to; it forms batches,
has its served model run them and hands back results).

A group of compatible requests (equal ``rows.batch_key``) runs as one Request with rows through the
pipeline's ``"rows"`` stages: one text-encoder call, one transformer call per step and branch, one
VAE decode for all of them. Every request keeps its own noise (its own generator), prompts and
per-row guidance, so its result equals its solo run. Requests that fail on their own (bad
parameters, an unreadable image) fail alone; the others complete.

Cancellation is step-level: ``BatchScheduler.cancel`` on a running request makes its step callback raise
``RequestCancelledError`` at the next denoising step boundary. Alone (or with every row of its batch
cancelled) the run stops there and the compute is free for the next batch; in a batch with live rows its
future ends there and its rows ride along to the batch's end (``rows._fan_out``), the others unchanged.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from .. import ignored
from ..errors import EngineShutdownError, QueueFullError, RequestCancelledError
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


def run_batch(pipeline, requests: list[Request], starting=None) -> list:
    """Run validated Requests through ``pipeline``'s stage loop, together where they are compatible; returns,
    in order, each finished Request or the exception it failed with (None for one that ``starting``
    dropped). ``starting(indices)`` (optional) is asked just before each group runs which of its requests
    still want to: a request cancelled while an earlier group ran is left out."""
    chosen = [pipeline.for_request(r) for r in requests]  # the composition (task) each request asks for
    if any(c is not chosen[0] for c in chosen):
        return _by_composition(requests, chosen, starting)
    pipeline = chosen[0] if chosen else pipeline
    first = batch_plan(pipeline)
    if first is None or len(requests) == 1:
        return [_alone(pipeline, r) if starting is None or starting([i])[0] else None for i, r in enumerate(requests)]
    errors: dict[int, Optional[BaseException]] = {}
    live = {}
    for i, req in enumerate(requests):  # alone, up to where rows merge (sizes and CFG are known then)
        try:
            live[i] = pipeline.forward(req, stop=first)
        except Exception as exc:  # this request fails alone
            errors[i] = exc
    groups: dict[Any, list[int]] = {}
    for i, req in live.items():
        groups.setdefault(rows.batch_key(pipeline, req), []).append(i)
    for indices in groups.values():
        if starting is not None:
            keep = starting(indices)
            for i, k in zip(indices, keep):
                if not k:
                    errors[i] = None
            indices = [i for i, k in zip(indices, keep) if k]
            if not indices:
                continue
        parts = [live[i] for i in indices]
        try:
            if len(parts) == 1:
                live[indices[0]] = pipeline.forward(parts[0])
                shared_reads: set = set()
            else:
                merged = rows.merge(parts)
                rows.split(pipeline.forward(merged, parts=parts), parts)
                shared_reads = merged.params_read  # what the merged stages read, for every row
        except Exception as exc:  # the group's shared work failed: every request in it fails
            for i in indices:
                errors[i] = exc
            continue
        for part in parts:  # the ignored-parameter rule, as for a request run alone
            ignored.say_unread([part.params], part.params_read | shared_reads)
    return [errors[i] if i in errors else live[i] for i in range(len(requests))]


def _by_composition(requests: list[Request], chosen: list, starting) -> list:
    """Requests for different compositions (text-to-image, img2img, inpaint) never share rows: each
    composition's requests run as their own batch."""
    out: list = [None] * len(requests)
    for comp in {id(c): c for c in chosen}.values():
        idx = [i for i, c in enumerate(chosen) if c is comp]
        sub_starting = None if starting is None else (lambda ids, idx=idx: starting([idx[j] for j in ids]))
        for i, result in zip(idx, run_batch(comp, [requests[i] for i in idx], sub_starting)):
            out[i] = result
    return out


def _alone(pipeline, req: Request):
    """One request run by itself (generate, or a batch of one): its result, then a warning for each parameter
    it was given that nothing read while it was validated and run (the ignored-parameter rule)."""
    try:
        out = pipeline.forward(req)
    except RequestCancelledError as exc:  # stopped part-way: its unread parameters say nothing
        return exc
    except Exception as exc:
        ignored.say_unread([req.params], req.params_read)
        return exc
    ignored.say_unread([req.params], req.params_read)
    return out


class _Item:
    __slots__ = ("request", "future", "stop")

    def __init__(self, request, future: concurrent.futures.Future):
        self.request, self.future = request, future
        self.stop = threading.Event()  # set by cancel() while it runs: stop at the next step boundary


class BatchScheduler:
    """Accepts requests from many threads, runs them in batches on one served model, one batch at a time.

    ``model``: a ``diffcore.protocols.ServedModel`` (a DiffGenerator, or the torchrun Leader whose
    batches run on every rank): it makes Requests (``request``) and runs them (``run_requests``).
    A batch starts when ``max_batch_size`` requests wait or the oldest has waited ``max_wait_ms``.
    ``submit`` returns a Future of the request's GenerationResult; a request with bad parameters gets
    its own SamplingParamError on its future while the rest of its batch completes. ``cancel`` drops a
    waiting request, and stops a running one at its next denoising step (where ``model.stops_at_steps``,
    true unless the model says otherwise: a batch spread over torchrun ranks runs to its end on all). ``on_batch``
    (optional, settable) is called with each batch's size, for metrics.
    """

    def __init__(self, model, max_batch_size: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.model = model
        self.max_batch_size, self.max_wait_ms, self.max_queue = max_batch_size, float(max_wait_ms), max_queue
        self.on_batch: Optional[Callable[[int], None]] = None
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0
        self._current: list[_Item] = []  # the batch that runs now
        self._stops = bool(getattr(model, "stops_at_steps", True))
        self._worker = threading.Thread(target=self._loop, name="diffcore-batch-scheduler", daemon=True)
        self._worker.start()

    # -- callers ---------------------------------------------------------------------------
    def submit(self, request: Request | dict, on_step: Optional[Callable[[int, int], None]] = None
               ) -> concurrent.futures.Future:
        """Queue one request: a Request the model made (``model.request``: a server validates on arrival and
        queues what it got), or generate() keywords, converted when its batch forms (a bad one fails on its
        own future). ``on_step(step, num_steps)`` reports progress after every denoising step (from 1)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise EngineShutdownError()
            if self._depth() >= self.max_queue:
                raise QueueFullError(self.max_queue)
            item = _Item(None, future)
            if isinstance(request, Request):
                request.callback = self._progress(item, request.callback, on_step, request.params.num_inference_steps)
            else:
                request = (dict(request), on_step)
            item.request = request
            self._queue.append(item)
            self._cond.notify_all()
        return future

    def cancel(self, future: concurrent.futures.Future) -> bool:
        """Drop a request that has not started (True). A running one (False) is stopped at its next denoising
        step boundary: its future then ends with ``RequestCancelledError`` (see the module's docstring)."""
        with self._cond:
            if future.cancel():
                self._queue = deque(item for item in self._queue if item.future is not future)
                return True
            if self._stops:
                for item in self._current:
                    if item.future is future:
                        item.stop.set()
            return False

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
            self._running, self._current = len(batch), batch
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
                        self._running, self._current = 0, []

    def _execute(self, batch: list[_Item]) -> None:
        reqs, items = [], []
        for item in batch:
            try:
                reqs.append(self._request_of(item))
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

        def starting(indices):  # False: cancelled while an earlier group of the batch ran
            return [items[i].future.set_running_or_notify_cancel() for i in indices]

        try:
            outcomes = self.model.run_requests(reqs, starting)
        except BaseException as exc:  # nothing of the batch can complete
            outcomes = [exc if items[i].future.running() else None for i in range(len(reqs))]
        for item, outcome in zip(items, outcomes):
            if outcome is None or item.future.done():  # cancelled: waiting, or at a step (_progress)
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    def _request_of(self, item: _Item) -> Request:
        if isinstance(item.request, Request):
            return item.request
        kwargs, on_step = item.request  # submitted as keywords: made here, once
        req = self.model.request(kwargs)
        req.callback = self._progress(item, req.callback, on_step, req.params.num_inference_steps)
        return req

    def _progress(self, item: _Item, user, on_step, num_steps: int):
        """The request's step callback: the cancellation check (end its future, raise ``RequestCancelledError``
        to stop the loop), then its own ``callback`` (if any), then ``on_step(step, num_steps)``."""
        if user is None and on_step is None and not self._stops:
            return None

        def callback(step, t, latents):
            if item.stop.is_set():
                error = RequestCancelledError(step + 1)
                if not item.future.done():
                    item.future.set_exception(error)
                raise error
            if user is not None:
                user(step, t, latents)
            if on_step is not None:
                on_step(step + 1, num_steps)

        return callback
