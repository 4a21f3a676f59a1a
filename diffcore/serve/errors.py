"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status."""
from __future__ import annotations

import logging
from typing import Optional

from ..errors import (ConfigError, DiffcoreError, EngineShutdownError, InputError, LoraError, LoraInUseError,
                      LoraNotFoundError, QueueFullError, RequestCancelledError, SamplingParamError)

log = logging.getLogger("diffcore.serve")


class APIError(Exception):
    """An error answered to the client as it is."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self, request_id: Optional[str] = None) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}


def bad_param(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def from_exception(exc: BaseException, param: Optional[str] = None) -> APIError:
    """Map an engine exception to what the client sees; anything unexpected is a 500 (logged by the caller).
    ``param``: the request field a LoRA error is about (default ``loras``, the per-request selection)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LoraInUseError):
        return APIError(409, str(exc), param=param or "loras", code="lora_in_use")
    if isinstance(exc, LoraNotFoundError):
        return APIError(400, str(exc), param=param or "loras", code="lora_not_found")
    if isinstance(exc, LoraError):
        return APIError(400, str(exc), param=param or "loras", code="invalid_lora")
    if isinstance(exc, SamplingParamError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc) or "the request queue is full; retry later", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, RequestCancelledError):  # nginx's 499 "client closed request": nobody waits for it
        return APIError(499, str(exc), code="cancelled")
    if isinstance(exc, EngineShutdownError):
        return APIError(503, str(exc) or "the server is shutting down", type="server_error", code="shutting_down")
    if isinstance(exc, (InputError, ConfigError)):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, DiffcoreError):
        return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="internal_error")
    return APIError(500, "internal server error", type="server_error", code="internal_error")
