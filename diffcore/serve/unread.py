"""Fields the served model does not take are a 400 over HTTP (issue 30 item 6), by the core's one rule.

Why: in Python an ignored parameter is a warning (diffcore.ignored: set, but nothing read it); a client
of a server never sees the server's log, so a field that changes nothing would look honoured. The server
asks the core, three times, and answers 400 (``code: "unused_parameter"``, ``param``: the field):

1. on arrival, the notices of the request's input validation that name an ignored parameter
   (``negative_prompt`` with classifier-free guidance off, ``num_frames`` on an image model,
   ``guidance_scale`` on a guidance-distilled checkpoint; diffcore.notices.ignored_params);
2. on arrival, the fields an earlier finished request of the same composition (CFG on or off alike)
   left unread (diffcore.ignored.predicted): refused before they cost any compute;
3. after the run, the fields it did not read (``GenerationResult.ignored_parameters``): the first request
   that sets such a field is refused once it ran (it cannot be known before), then (2) refuses its like.

``ALLOWED``: fields peers' clients send to every model (SGLang, vLLM-Omni, LiteLLM: diffcore.testing.peers),
which cannot change a picture when the model does not read them: accepted, named in a warning (the log and
the ``x-diffcore-warnings`` header), never refused.
"""
from __future__ import annotations

import logging

from .. import ignored, notices
from .errors import APIError

log = logging.getLogger("diffcore.serve")

ALLOWED = {  # name -> why it is harmless
    "negative_prompt": "peers' example clients send a default negative prompt to every model; with guidance off "
                       "(or a guidance-distilled checkpoint) it changes nothing",
}
_FIELD = {"height": "size", "width": "size"}  # the request field a parameter comes from


def _refuse(name: str, why: str) -> APIError:
    field = _FIELD.get(name, name)
    return APIError(400, f"{field} is not used by this model for this request ({why}): leave it out",
                    param=field, code="unused_parameter")


def _allowed(name: str, why: str, warnings: list) -> bool:
    if name not in ALLOWED:
        return False
    text = f"{name} ignored: {why}"
    log.warning("request field %s", text)
    warnings.append(text)
    return True


def check_arrival(generator, req, warnings: list) -> None:
    """Refuse (APIError 400) a validated, not yet run ``req`` that sets a field its model will not read."""
    # a notice about a value the client did not set, or set to the model's default, is not the client's doing
    given = {n for n in getattr(req.params, "_given", ()) if not ignored.is_default(req.params, n)}
    for name, text in sorted(notices.ignored_params(req.notices).items()):
        if name in given and not _allowed(name, text, warnings):
            raise _refuse(name, text)
    for name in sorted(ignored.predicted(generator.pipeline.for_request(req), req)):
        if not _allowed(name, "nothing reads it", warnings):
            raise _refuse(name, "an earlier request found that nothing in this model reads it")


def check_result(result, warnings: list) -> None:
    """Refuse (APIError 400) a finished request's result when it set a field nothing read."""
    for name in result.ignored_parameters:
        if not _allowed(name, "nothing reads it", warnings):
            raise _refuse(name, "it was set, but nothing read it while the request ran")
