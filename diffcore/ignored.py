"""One rule, in the core, for parameters a model ignores: a parameter the caller set that the model never
read while it ran is reported (a warning naming it), whatever the family.

Why: per-family lists of what each model ignores drift (guidance_scale on a model without guidance
embedding, max_sequence_length on a model without a text limit were silently dropped). Reading is the
truth: SamplingParams records the fields read while a request runs (``tracking``), and what the caller
gave but nothing read is said once, by the run (a server's check on arrival stays quiet).

A server refuses such parameters instead (diffcore.serve.unread): what a request was given and its run did
not read is ``unread(req)`` (``GenerationResult.ignored_parameters``), and ``learn`` / ``predicted`` remember,
per composition and CFG on/off, the parameters a finished run left unread, so the next request that sets one
is refused on arrival, before it costs any compute.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from contextvars import ContextVar
from typing import Iterable, Iterator, Optional

from .notices import notice

log = logging.getLogger("diffcore")

_READS: ContextVar[Optional[set]] = ContextVar("diffcore_param_reads", default=None)
# Read by the engine itself around the model's stages (the request's generator, the result's format, a video's
# frame rate: an image model's input validation says fps is ignored).
ENGINE_FIELDS = frozenset({"prompt", "seed", "output_type", "loras", "fps"})


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


def is_default(params, name: str) -> bool:
    """Whether ``params.<name>`` is the model's own default (sending it changes nothing: a playground or a
    client that fills every field with the defaults it was shown)."""
    import attrs

    field = attrs.fields_dict(type(params)).get(name)
    if field is None:
        return False
    default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
    try:
        return bool(object.__getattribute__(params, name) == default)
    except Exception:  # values that do not compare (arrays)
        return False


def unread(req) -> set:
    """The parameters ``req``'s caller gave, other than at the model's default, that nothing read while it was
    validated and run."""
    left = set(getattr(req.params, "_given", ())) - req.params_read - ENGINE_FIELDS
    return {name for name in left if not is_default(req.params, name)}


# composition (a pipeline) -> {do_cfg: (fields some finished run read, fields a finished run left unread)}
_LEDGERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def learn(pipeline, req) -> None:
    """After ``req`` ran to its end on ``pipeline`` (its composition): remember what it read and left unread.
    A parameter any run read is never predicted unread (reads may depend on values; a read wins)."""
    with _LOCK:
        read, left = _LEDGERS.setdefault(pipeline, {}).setdefault(bool(req.do_cfg), (set(), set()))
        read.update(req.params_read)
        left.update(unread(req))
        left.difference_update(read)


def predicted(pipeline, req) -> set:
    """The parameters ``req`` (validated, not run) was given that an earlier finished run of the same
    composition, CFG on or off alike, left unread and no run read."""
    with _LOCK:
        read, left = _LEDGERS.get(pipeline, {}).get(bool(req.do_cfg), (set(), set()))
        return (unread(req) & left) - read
