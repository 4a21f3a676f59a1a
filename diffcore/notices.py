"""Warnings about one request's parameters (a rounded size, an ignored parameter), said when it runs.

Why: a request is validated once, when it is made, and may run later (a server validates on arrival
and queues it) or never (cancelled while it waited). What its validation noticed belongs to its run,
so ``ComposedPipelineBase.validate`` keeps it on the Request (``Request.notices``) and the pipeline's
stage loop says it when the request runs. The config hooks that notice things (``round_size``) do not
see the Request, hence the context variable; outside a validation they log at once.
"""
from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from typing import Iterator, Optional

_KEPT: ContextVar[Optional[list]] = ContextVar("diffcore_request_notices", default=None)


def notice(logger: logging.Logger, message: str, *args, ignored: Optional[str] = None) -> None:
    """``logger.warning(message, *args)``, now or (inside ``kept``) when the request runs. ``ignored``: the
    parameter this notice says is ignored (a server refuses such a request: ``ignored_params``)."""
    kept_for = _KEPT.get()
    if kept_for is None:
        logger.warning(message, *args)
    else:
        kept_for.append((logger, message, args, ignored))


@contextlib.contextmanager
def kept(into: list) -> Iterator[None]:
    """Inside the block (a request's validation) notices are appended to ``into`` instead of logged."""
    token = _KEPT.set(into)
    try:
        yield
    finally:
        _KEPT.reset(token)


def say(pending: list) -> None:
    """Log the kept notices (once: the list is emptied)."""
    while pending:
        logger, message, args, _ = pending.pop(0)
        logger.warning(message, *args)


def ignored_params(pending: list) -> dict[str, str]:
    """``{parameter: the notice's text}`` for the kept notices that say a parameter is ignored."""
    return {name: message % args for _, message, args, name in pending if name is not None}
