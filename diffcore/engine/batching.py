"""Running many requests together: ``run_batch`` (validated Requests through one pipeline's stage loop,
grouped by compatibility) and ``BatchScheduler`` (a queue that many threads submit to; it forms batches,
has its served model run them and hands back results).

A group of compatible requests (equal ``rows.batch_key``) runs as one Request with rows through the
pipeline's ``"rows"`` stages: one text-encoder call, one transformer call per step and branch, one
VAE decode for all of them. Every request keeps its own noise (its own generator), prompts and
per-row guidance, so its result equals its solo run. Requests that fail on their own (bad
parameters, an unreadable image) fail alone; the others complete.

Cancellation is step-level: ``BatchScheduler.cancel`` on a running request makes its step callback raise
``RequestCancelledError`` at the next denoising step boundary. In a step batch (diffcore.engine.stepping) its
rows leave the batch there and the others go on; in a start-only batch (``run_batch``) with live rows its
future ends there and its rows ride along to the batch's end (``rows._fan_out``), the others unchanged; alone
(or with every row of its batch cancelled) the run stops there.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from .. import ignored
from ..errors import EngineShutdownError, QueueFullError, RequestCancelledError, SamplingParamError
from ..request import Request
from . import rows, stepping

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
            part.params_read |= shared_reads
            ignored.say_unread([part.params], part.params_read)
            ignored.learn(pipeline, part)
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
    ignored.learn(pipeline, req)
    return out


class _Item:
    __slots__ = ("request", "future", "stop", "started", "key")

    def __init__(self, request: Request, future: concurrent.futures.Future, key=None):
        self.request, self.future, self.key = request, future, key  # key: its step key (None: start-only)
        self.stop = threading.Event()  # set by cancel() while it runs: stop at the next step boundary
        self.started = 0.0  # step batches: perf_counter when it began to run, less its validation time


class BatchScheduler:
    """Accepts requests from many threads, runs them in batches on one served model.

    ``model``: a ``diffcore.protocols.ServedModel`` (a DiffGenerator, or the torchrun Leader whose
    batches run on every rank): it makes Requests (``request``) and runs them (``run_requests``).
    A batch starts when ``max_batch_size`` requests wait or the oldest has waited ``max_wait_ms``.
    ``submit`` returns a Future of the request's GenerationResult. ``cancel`` drops a waiting request, and
    stops a running one at its next denoising step (where ``model.stops_at_steps``, true unless the model
    says otherwise: a batch spread over torchrun ranks runs to its end on all). ``on_batch`` (optional,
    settable) is called with the number of requests that start together (a batch, or the requests that
    join a running one at a step boundary), for metrics.

    Where the model's pipeline can step rows on their own (``stepping.step_stage``: the standard denoising
    stage), requests run in ``stepping.StepBatch``-es, one per step key (size, CFG on/off, task; not the
    schedule), stepped in turn: a cancelled or finished request leaves at a step boundary (its rows are not
    computed again, the finished one is answered at once), and with ``step_batching`` (default) waiting
    requests are admitted at every step boundary, in queue order, each into the step batch of its key (a new
    one for a new key) at its own step 0, while fewer than ``max_batch_size`` requests run. A waiting request
    that runs in start-only batches stops the admitting, so the step batches drain and its turn comes (first
    come, first served). Those (few-step, block-causal, LTX-2, two-expert, step caches, torchrun) run through
    ``run_batch``.
    """

    def __init__(self, model, max_batch_size: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64,
                 step_batching: bool = True):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.model = model
        self.max_batch_size, self.max_wait_ms, self.max_queue = max_batch_size, float(max_wait_ms), max_queue
        self.on_batch: Optional[Callable[[int], None]] = None
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0
        self._current: list[_Item] = []  # the requests that run now
        self._stops = bool(model.stops_at_steps)
        self.step_batching = bool(step_batching) and self._stops  # requests join running batches
        self._worker = threading.Thread(target=self._loop, name="diffcore-batch-scheduler", daemon=True)
        self._worker.start()

    # -- callers ---------------------------------------------------------------------------
    def submit(self, request: Request, on_step: Optional[Callable[[int, int], None]] = None
               ) -> concurrent.futures.Future:
        """Queue one validated Request (``model.request(kwargs)``: bad parameters are refused there, before
        anything queues). ``on_step(step, num_steps)`` reports progress after every denoising step (from 1)."""
        if not isinstance(request, Request):
            raise SamplingParamError("request", f"BatchScheduler.submit takes a validated Request (make it with "
                                                f"model.request(kwargs)), got {type(request).__name__}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        key = self._step_key(request)
        with self._cond:
            if self._closed:
                raise EngineShutdownError()
            if self._depth() >= self.max_queue:
                raise QueueFullError(self.max_queue)
            item = _Item(request, future, key)
            request.callback = self._progress(item, request.callback, on_step, request.params.num_inference_steps)
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

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Accept nothing new. What is queued or running still completes, unless ``cancel``: then waiting
        requests are cancelled and running ones stop at their next denoising step (``cancel`` above).
        ``wait``: until the worker is done."""
        with self._cond:
            self._closed = True
            if cancel:
                for item in list(self._queue):
                    item.future.cancel()
                self._queue.clear()
                if self._stops:
                    for item in self._current:
                        item.stop.set()
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
                if not item.future.cancelled():  # marked running only when it starts
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
        if batch[0].key is not None:  # its steppable requests run now; the others wait for their turn
            steppable = [item for item in batch if item.key is not None]
            self._requeue([item for item in batch if item.key is None])
            self._observe(len(steppable))
            return self._run_steps(steppable)
        self._observe(len(batch))
        reqs = [item.request for item in batch]

        def starting(indices):  # False: cancelled while an earlier group of the batch ran
            return [batch[i].future.set_running_or_notify_cancel() for i in indices]

        try:
            outcomes = self.model.run_requests(reqs, starting)
        except BaseException as exc:  # nothing of the batch can complete
            outcomes = [exc if item.future.running() else None for item in batch]
        for item, outcome in zip(batch, outcomes):
            if outcome is None or item.future.done():  # cancelled: waiting, or at a step (_progress)
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    def _observe(self, size: int) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(size)
            except Exception:  # metrics must not break serving
                log.exception("on_batch callback failed")

    # -- step batches (diffcore.engine.stepping) ---------------------------------------------
    def _step_key(self, request: Request):
        if not self._stops:
            return None
        try:
            return stepping.step_key(self.model.pipeline, request)
        except Exception:  # e.g. a composition the model lacks: run_batch gives that request its error
            return None

    def _requeue(self, items: list[_Item]) -> None:
        """Put requests back at the head of the queue, in order (they have not started)."""
        if items:
            with self._cond:
                self._queue.extendleft(reversed(items))
                self._forget(items)

    def _forget(self, items: list[_Item]) -> None:
        """Requests that no longer run (under the lock)."""
        gone = {id(item) for item in items}
        self._current = [item for item in self._current if id(item) not in gone]
        self._running = len(self._current)

    def _run_steps(self, items: list[_Item]) -> None:
        """Run step batches, one per step key (interleaved: one step of each in turn), until all have drained;
        between two rounds, with ``step_batching``, waiting requests join (``_joiners``)."""
        groups: dict = {}
        self._admit(groups, items)
        while groups:
            for key, batch in list(groups.items()):
                try:
                    left = batch.step()
                except BaseException as exc:  # the shared step failed: every request in it fails
                    left = [(row.token, exc) for row in batch.rows]
                    batch.close()
                for item, outcome in left:
                    self._settle(item, outcome)
                with self._cond:
                    self._forget([item for item, _ in left])
                if not len(batch):
                    del groups[key]
            if self.step_batching:
                joiners = self._joiners(self.max_batch_size - sum(len(b) for b in groups.values()))
                if joiners:
                    self._observe(len(joiners))
                    self._admit(groups, joiners)

    def _joiners(self, room: int) -> list[_Item]:
        """Waiting requests from the head of the queue (up to ``room``), in order. One that runs in start-only
        batches (no step key) stops the search: the running step batches drain, then its turn comes."""
        taken: list[_Item] = []
        with self._cond:
            while self._queue and len(taken) < room and not self._closed:
                head = self._queue[0]
                if head.future.cancelled():
                    self._queue.popleft()
                    continue
                if head.key is None:
                    break
                taken.append(self._queue.popleft())
            self._current = self._current + taken
            self._running = len(self._current)
        return taken

    def _admit(self, groups: dict, items: list[_Item]) -> None:
        """Make requests rows of the step batch of their key in ``groups`` (a new one for a new key); each is
        prepared alone up to denoising, a failure is its own."""
        failed = []
        for item in items:
            if not item.future.set_running_or_notify_cancel():  # cancelled while it waited
                failed.append(item)
                continue
            item.started = time.perf_counter() - sum(item.request.timings.values())  # validation counts
            try:
                if item.key not in groups:
                    groups[item.key] = stepping.StepBatch(self.model.pipeline.for_request(item.request))
                groups[item.key].add(item.request, item)
            except Exception as exc:
                item.future.set_exception(exc)
                failed.append(item)
        if failed:
            with self._cond:
                self._forget(failed)

    def _settle(self, item: _Item, outcome) -> None:
        if item.future.done():  # cancelled at a step (_progress ended its future)
            return
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
            return
        try:
            outcome.timings["total"] = time.perf_counter() - item.started
            item.future.set_result(self.model.result(outcome))
        except Exception as exc:
            item.future.set_exception(exc)

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
