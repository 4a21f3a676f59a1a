"""How `diffcore serve` starts under torchrun: the launch checks, rank 0's loader, the other ranks' main.

The protocol itself (what rank 0 broadcasts, how the other ranks follow) is diffcore.serve.distributed.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Optional

from ..errors import DiffcoreError, ParallelConfigError
from .distributed import Channel, Leader, follow

log = logging.getLogger("diffcore.serve")


def layout_world(engine_kwargs: dict) -> int:
    """Processes the engine options ask for (``EngineArgs.world_size``: sp_degree x (2 with cfg_parallel))."""
    from ..configs.engine_args import EngineArgs

    return EngineArgs(sp_degree=engine_kwargs.get("sp_degree") or 1,
                      cfg_parallel=bool(engine_kwargs.get("cfg_parallel"))).world_size


def check_launch(engine_kwargs: dict) -> None:
    """Before the port is bound: the processes torchrun started must be the ones the layout asks for
    (several servers without a layout would fight for one port; a layout without its ranks cannot load)."""
    world = layout_world(engine_kwargs)
    launched = int(os.environ.get("WORLD_SIZE") or 1)
    if launched > 1 and world == 1:
        raise ParallelConfigError(
            f"diffcore serve was launched as {launched} processes but --sp-degree 1 without --cfg-parallel uses one; "
            f"pass --sp-degree/--cfg-parallel (world size = sp_degree x 2 with cfg_parallel), or for more "
            "requests per second use replicas (--replicas N) instead of torchrun")
    if world > 1 and launched != world:
        flags = f"--sp-degree {int(engine_kwargs.get('sp_degree') or 1)}" + (
            " --cfg-parallel" if engine_kwargs.get("cfg_parallel") else "")
        how = f"was launched as {launched} processes" if "WORLD_SIZE" in os.environ else "was not started by torchrun"
        raise ParallelConfigError(
            f"{flags} needs {world} processes (sp_degree x {2 if engine_kwargs.get('cfg_parallel') else 1}), but "
            f"diffcore serve {how}; run `torchrun --nproc-per-node {world} -m diffcore serve ... {flags}` "
            "(docs/scale.md), or drop the parallel flags to serve from one process")


def ignore_stop_signals(rank: int) -> None:
    """Ranks > 0 stop when rank 0 says so (after it drained its requests), not when torchrun forwards a signal."""
    def note(sig, frame):
        log.warning("rank %d: got signal %d; exiting once rank 0 has finished its requests", rank, sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note)


class LeaderLoader:
    """Rank 0's model loader for the server: load, open the channel, wrap in a Leader; ``close`` stops every
    rank once the server is done (also when it stopped while the model was still loading)."""

    def __init__(self, load: Callable[[], Any]):
        self.load, self.leader = load, None
        self.on_broken: Optional[Callable[[str], None]] = None  # handed to the Leader (see Leader.broken)
        self.done = threading.Event()

    def __call__(self) -> Leader:
        try:
            generator = self.load()
            self.leader = Leader(generator, Channel(), on_broken=self.on_broken)
            return self.leader
        finally:
            self.done.set()

    @property
    def broken(self) -> Optional[str]:
        return None if self.leader is None else self.leader.broken

    def close(self, loading: bool) -> None:
        """``loading``: the server started this loader (in a thread that may not have begun yet): wait for it,
        since the other ranks are loading too and only a channel can stop them."""
        if loading:
            self.done.wait()
        if self.leader is not None:
            self.leader.stop()
            close_groups(self.leader.generator, self.leader.channel)


def close_groups(generator, channel: Channel) -> None:
    channel.close()
    groups = generator.pipeline.parallel
    if groups is not None:
        groups.close()


def follow_main(load: Callable[[], Any]) -> int:
    """A rank > 0 of `diffcore serve`: load the same model, then follow rank 0 until it stops. Until the channel
    exists, torchrun's signals end this rank as usual (rank 0 may have failed to load and exited)."""
    import sys

    rank = int(os.environ.get("RANK", "0"))
    try:
        generator = load()
    except DiffcoreError as exc:
        print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 2
    channel = Channel()
    ignore_stop_signals(rank)
    try:
        return follow(generator, channel)
    finally:
        close_groups(generator, channel)
