"""Warnings about one request's parameters (a rounded size, an ignored parameter), said once per request.

Why: a server checks each request when it arrives (``DiffGenerator.check`` runs the input validation)
and the same validation runs again when the request runs; the warnings belong to the run, so the check
stays silent. A contextvar, so a check in one thread never silences a run in another.
"""
from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from typing import Iterator

_QUIET: ContextVar[bool] = ContextVar("diffcore_quiet_notices", default=False)


def notice(logger: logging.Logger, message: str, *args) -> None:
    """``logger.warning(message, *args)``, unless this context is only checking the request."""
    if not _QUIET.get():
        logger.warning(message, *args)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Inside the block (a check before the real run) request notices are not logged."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)
