"""One rule, in the core, for parameters a model ignores: a parameter the caller set that the model never
read while it ran is reported (a warning naming it), whatever the family.

Why: per-family lists of what each model ignores drift (guidance_scale on a model without guidance
embedding, max_sequence_length on a model without a text limit were silently dropped). Reading is the
truth: SamplingParams records the fields read while a request runs (``tracking``), and what the caller
gave but nothing read is said once, by the run (a server's check on arrival stays quiet).
"""
from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from typing import Iterable, Iterator, Optional

from .notices import notice

log = logging.getLogger("diffcore")

_READS: ContextVar[Optional[set]] = ContextVar("diffcore_param_reads", default=None)
# Read by the engine itself around the model's stages (the request's generator, the result's format).
ENGINE_FIELDS = frozenset({"prompt", "seed", "output_type", "loras"})


def record(name: str) -> None:
    reads = _READS.get()
    if reads is not None:
        reads.add(name)


@contextlib.contextmanager
def recording(reads: set) -> Iterator[None]:
    """Add to ``reads`` the fields read in the enclosed code (a request's validation, later its run: the
    pipeline keeps them on ``Request.params_read``)."""
    token = _READS.set(reads)
    try:
        yield
    finally:
        _READS.reset(token)


def say_unread(params: Iterable, reads: set) -> None:
    """Warn about every field the caller gave that nothing in ``reads`` read."""
    given = {n for p in params for n in getattr(p, "_given", ())}
    for name in sorted(given - reads - ENGINE_FIELDS):
        notice(log, "%s is ignored: this model does not use it (it was set, but nothing read it)", name)


@contextlib.contextmanager
def tracking(params: Iterable) -> Iterator[None]:
    """Around one run: afterwards, warn about every field the caller gave that no stage read."""
    params, reads = list(params), set()
    try:
        with recording(reads):
            yield
    finally:
        say_unread(params, reads)
