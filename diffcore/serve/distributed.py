"""`diffcore serve` under torchrun (sequence / CFG parallel): rank 0 serves, every rank computes.

Rank 0 runs the HTTP server and the batching scheduler as in one process. Every call that computes or
changes the model's state (a batch the scheduler starts, a LoRA load / unload / fuse) is first
broadcast over a dedicated gloo group (Python objects go over gloo even when the model's groups are
NCCL), then run on rank 0 while the other ranks run the same call on their copy of the model (their
collectives meet rank 0's) and discard the result. Then every rank reports how each request ended
(ok, or the exception's class and message) and rank 0 checks they agree: a request that fails on rank 0
failed on every rank, and a disagreement fails the request with a clear error instead of serving a
wrong result. After a disagreement the ranks' models may differ, so the Leader is ``broken``: it runs
nothing more, and the server stops (503 meanwhile) and exits 1 for torchrun ``--max-restarts`` to restart.

* ``Leader``: rank 0's generator, an explicit ``diffcore.protocols.ServedModel``. Reads (config, sampling
  params, loaded LoRAs, making a Request) go to the local model; state-changing calls go to every rank. The server's runner comes from ``Leader.make_runner``, so the
  routes never know the model is spread over processes.
* ``Leader.run_requests``: what the server's BatchScheduler (``Leader.make_runner``) runs each batch with:
  the validated Requests' parameters go to every rank (``diffcore.engine.intake.portable``), each rank
  makes them into Requests by the same conversion and runs them. A batch is fixed when it is broadcast:
  a request can be cancelled while it waits, not once its batch started.
* ``follow``: the loop of ranks > 0: receive, run, report; until rank 0 sends ``stop``.

Requests are validated on rank 0 when they are made (routes, scheduler, ``generate_batch``) before they
are broadcast, so bad parameters never reach the other ranks. Shutdown: rank 0 (SIGINT/SIGTERM to it, or to torchrun, which forwards the
signal to every rank) drains its queue, then broadcasts ``stop``; the other ranks ignore the signal
and exit 0 when ``stop`` arrives. While idle, rank 0 sends a ``ping`` every ``HEARTBEAT_S`` so the
waiting ranks' receive never runs into gloo's operation timeout. How `diffcore serve` starts all this
is diffcore.serve.torchrun.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..engine import intake
from ..engine.batching import BatchScheduler
from ..errors import DiffcoreError, EngineShutdownError
from ..protocols import ServedModel

log = logging.getLogger("diffcore.serve")
HEARTBEAT_S = 60.0  # well under gloo's default 30 min operation timeout
OUTCOME_CHARS = 2000  # of an error's message gathered from every rank


class RanksDisagreeError(DiffcoreError):
    """Rank 0 and another rank ended the same call differently; the result is not trustworthy."""

    def __init__(self, call: str, outcomes: list):
        described = "; ".join(f"rank {r}: {o or 'ok'}" for r, o in enumerate(outcomes))
        super().__init__(f"the parallel ranks disagree on {call} ({described}); their models are out of step, so the "
                         "server stops and exits 1 (torchrun --max-restarts N restarts it); please report the bug")


class RanksOutOfStepError(EngineShutdownError):
    """Work refused because the ranks disagreed earlier: nothing more runs until the server is restarted."""

    def __init__(self, why: str):
        DiffcoreError.__init__(self, f"the server is stopping for a restart: {why}")


class Channel:
    """Python objects from rank 0 to every rank, and one small report back, over a gloo group of all ranks."""

    def __init__(self):
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo")  # collective: every rank creates it, after loading
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def send(self, message) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self):
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def report(self, outcome) -> Optional[list]:
        """Gather every rank's ``outcome`` on rank 0 (in rank order); None on the others."""
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(outcome, gathered, dst=0, group=self.group)
        return gathered

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group(self.group)


def _outcome(value, renamed: Optional[tuple[str, str]] = None) -> Optional[str]:
    """How a call ended, comparable across ranks: None (ok) or ``"Class: message"`` (two different errors of
    one class disagree). ``renamed``: (this rank's copy of a file, rank 0's path), so one failure reads alike."""
    if not isinstance(value, BaseException):
        return None
    message = str(value) if renamed is None else str(value).replace(*renamed)
    return f"{type(value).__name__}: {message}"[:OUTCOME_CHARS]


class _Renamed(Exception):
    """A follower's call on its copy of rank 0's file failed (the cause); reported under rank 0's path."""

    def __init__(self, copy: Path, original: str):
        super().__init__(copy, original)
        self.renamed = (str(copy), original)


class Leader(ServedModel):
    """Rank 0's generator: everything reads the local model; computing and state changes run on every rank.
    A ``diffcore.protocols.ServedModel`` like the DiffGenerator it wraps, declared: each member is defined here
    (tests/test_pipeline_protocols.py checks that none is left to the protocol's empty body)."""

    stops_at_steps = False  # a batch runs on every rank: stopping one rank's loop would strand the others
    broken: Optional[str] = None  # why the ranks fell out of step; once set, nothing more is broadcast

    def __init__(self, generator, channel: Channel, heartbeat_s: float = HEARTBEAT_S,
                 on_broken: Optional[Callable[[str], None]] = None):
        self.generator, self.channel = generator, channel
        self.broken = None
        self.on_broken = on_broken  # the server's cue to stop (and exit non-zero, so torchrun restarts it)
        self._lock = threading.Lock()  # one call on the channel at a time, in the same order on every rank
        self._stopped = False
        self._last_send = time.monotonic()
        self._runner = None
        self._wake = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,), name="diffcore-serve-heartbeat",
                                           daemon=True)
        self._heartbeat.start()

    # -- reads: rank 0's copy of the model (every rank loaded the same) ---------------------------
    # Spelled out, member by member of diffcore.protocols.ServedModel: a forwarding __getattr__ would
    # also forward what must not run on rank 0 alone (a new state-changing method of DiffGenerator).
    @property
    def model(self) -> str:
        return self.generator.model

    @property
    def sampling_params_cls(self) -> type:
        return self.generator.sampling_params_cls

    @property
    def config(self):
        return self.generator.config

    @property
    def pipeline(self):
        return self.generator.pipeline

    @property
    def loras(self) -> dict:
        return self.generator.loras

    def request(self, kwargs: dict, check_loras: bool = False):
        """A validated Request, made here (rank 0): bad parameters never reach the other ranks."""
        return self.generator.request(kwargs, check_loras=check_loras)

    def params_class(self, kwargs: dict) -> type:
        return self.generator.params_class(kwargs)

    # -- what runs on every rank ---------------------------------------------------------------
    def everywhere(self, name: str, payload, local: Callable[[], Any]):
        """Broadcast ``(name, payload)``, run ``local()`` here, check every rank ended it the same way.
        Returns ``(local's result or exception, every rank's outcome)``."""
        with self._lock:
            if self.broken is not None:
                raise RanksOutOfStepError(self.broken)
            if self._stopped:
                raise EngineShutdownError()
            self.channel.send((name, payload))
            self._last_send = time.monotonic()
            try:
                result = local()
            except Exception as exc:  # the same call fails on the other ranks: they report it
                result = exc
            mine = [_outcome(r) for r in result] if isinstance(result, list) else _outcome(result)
            return result, self.channel.report(mine)

    def run_requests(self, reqs: list, starting=None) -> list:
        """Run validated Requests (made here) on every rank: their parameters are broadcast, every rank runs
        them, rank 0 answers. The batch is fixed before it is broadcast (``starting`` is asked once, for all):
        every rank must run the same requests."""
        n = len(reqs)
        keep = starting(list(range(n))) if starting is not None else [True] * n
        live = [i for i in range(n) if keep[i]]
        out: list = [None] * n
        if not live:
            return out
        result, outcomes = self.everywhere("batch", [intake.portable(reqs[i]) for i in live],
                                           lambda: self.generator.run_requests([reqs[i] for i in live]))
        m = len(live)
        per_rank = [o if isinstance(o, list) else [o] * m for o in outcomes]  # a rank whose whole batch failed
        disagreements = {}
        for j in range(m):
            theirs = [o[j] for o in per_rank]
            if any(t != theirs[0] for t in theirs):
                disagreements[j] = self._break(RanksDisagreeError(f"request {j + 1} of a batch of {m}", theirs))
        if isinstance(result, BaseException):
            raise result
        for j, i in enumerate(live):
            out[i] = disagreements.get(j, result[j])
        return out

    def _state_call(self, name: str, payload, local: Callable[[], Any]):
        result, outcomes = self.everywhere(name, payload, local)
        if any(o != outcomes[0] for o in outcomes):
            raise self._break(RanksDisagreeError(name, outcomes))
        if isinstance(result, BaseException):
            raise result
        return result

    def _break(self, error: RanksDisagreeError) -> RanksDisagreeError:
        """The ranks' models may differ from now on: refuse all further work and tell the server to stop."""
        if self.broken is None:
            self.broken = str(error)
            log.error("%s", error)
            if self.on_broken is not None:
                self.on_broken(self.broken)
        return error

    def generate(self, **kwargs):
        return self.generate_batch([kwargs])[0]

    def generate_batch(self, requests: list[dict]) -> list:
        outcomes = self.run_requests([self.generator.request(kwargs) for kwargs in requests])
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    def load_lora(self, source, name: Optional[str] = None, weight_name: Optional[str] = None, *,
                  component: str = "transformer", ignore_text_encoder: bool = False) -> str:
        """Loaded on every rank. A file (an uploaded adapter) travels with the call, so ranks on other nodes
        need not see rank 0's temporary files; folders and Hub ids are loaded by each rank itself."""
        options = dict(name=name, weight_name=weight_name, component=component, ignore_text_encoder=ignore_text_encoder)
        path = Path(source) if isinstance(source, (str, Path)) else None
        payload = {"options": options, "source": str(source)}
        if path is not None and path.is_file():
            payload["file"] = (path.name, path.read_bytes())
        return self._state_call("load_lora", payload, lambda: self.generator.load_lora(source, **options))

    def unload_lora(self, name: str) -> None:
        return self._state_call("unload_lora", name, lambda: self.generator.unload_lora(name))

    def fuse_lora(self, loras: dict) -> None:
        return self._state_call("fuse_lora", dict(loras), lambda: self.generator.fuse_lora(loras))

    def unfuse_lora(self) -> None:
        return self._state_call("unfuse_lora", None, self.generator.unfuse_lora)

    @property
    def streams_blocks(self) -> bool:
        """No block streaming under torchrun: a block callback cannot be broadcast, and a realtime session's
        prompt changes would reach rank 0 only."""
        return False

    @property
    def can_preview(self) -> bool:
        """Streamed previews: rank 0 decodes them from its own copy of the batch every rank runs."""
        return self.generator.can_preview

    def attach_previews(self, req, on_preview, partial_images=None):
        """The preview hook stays on rank 0 (a function: only the parameters are broadcast)."""
        return self.generator.attach_previews(req, on_preview, partial_images)

    def run(self, params, callback=None, block_callback=None):
        raise DiffcoreError("under torchrun, run requests with generate()/generate_batch() (they reach every rank)")

    # -- the server's side ---------------------------------------------------------------------
    def make_runner(self, max_batch_size: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64,
                    step_batching: bool = True):
        """The batching scheduler whose batches run on every rank (through ``run_requests``); ``stop`` drains it.
        Its batches start and end together on every rank (``stops_at_steps`` is False): ``step_batching`` has
        no effect here."""
        self._runner = BatchScheduler(self, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                      max_queue=max_queue, step_batching=step_batching)
        return self._runner

    def stop(self) -> None:
        """Finish what the runner holds, then tell every rank to exit (idempotent)."""
        if self._runner is not None:
            self._runner.shutdown(wait=True)
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self.channel.send(("stop", self.broken))
        self._wake.set()

    def _beat(self, every: float) -> None:
        while not self._wake.wait(every / 4):
            with self._lock:
                if not self._stopped and time.monotonic() - self._last_send >= every:
                    self.channel.send(("ping", None))
                    self._last_send = time.monotonic()


# -- ranks > 0 -------------------------------------------------------------------------------------
def _batch(gen, kwargs_list: list[dict]) -> list:
    """Rank 0's requests, made here by the same conversion (each may fail alone), run together."""
    made = []
    for kwargs in kwargs_list:
        try:
            made.append(gen.request(kwargs))
        except Exception as exc:
            made.append(exc)
    reqs = [r for r in made if not isinstance(r, BaseException)]
    ran = iter(gen.run_requests(reqs) if reqs else [])
    return [r if isinstance(r, BaseException) else next(ran) for r in made]


def _load_lora(gen, payload: dict) -> None:
    if "file" not in payload:
        gen.load_lora(payload["source"], **payload["options"])
        return
    filename, data = payload["file"]
    with tempfile.TemporaryDirectory(prefix="diffcore-lora-") as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        try:
            gen.load_lora(path, **payload["options"])
        except Exception as exc:
            raise _Renamed(path, payload["source"]) from exc


CALLS = {"batch": _batch, "load_lora": _load_lora, "unload_lora": lambda gen, name: gen.unload_lora(name),
         "fuse_lora": lambda gen, loras: gen.fuse_lora(loras), "unfuse_lora": lambda gen, _: gen.unfuse_lora()}


def follow(generator, channel: Channel) -> int:
    """The loop of a rank > 0: run what rank 0 broadcasts, report how it ended, until ``stop``."""
    while True:
        name, payload = channel.receive()
        if name == "stop":
            if payload is not None:
                log.error("rank %d: stopping because %s", channel.rank, payload)
            return 0
        if name == "ping":
            continue
        try:
            result = CALLS[name](generator, payload)
        except Exception as exc:
            result = exc
        outcomes = [_reported(channel.rank, name, r) for r in (result if name == "batch" else [result])]
        channel.report(outcomes if name == "batch" else outcomes[0])


def _reported(rank: int, call: str, result) -> Optional[str]:
    """A follower's outcome of one call or request, its error logged here (rank 0 only sees the message)."""
    if not isinstance(result, BaseException):
        return None
    cause, renamed = (result.__cause__, result.renamed) if isinstance(result, _Renamed) else (result, None)
    log.warning("rank %d: %s failed: %s", rank, call, cause, exc_info=cause)
    return _outcome(cause, renamed)
