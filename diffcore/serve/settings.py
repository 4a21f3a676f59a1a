"""Server options (what `diffcore serve` flags set): network, limits, batching, security."""
from __future__ import annotations

import math
from typing import Optional

import attrs

from ..errors import ConfigError


def _flag(attribute) -> str:
    return f"serve option {attribute.name} (--{attribute.name.replace('_', '-')})"


def _positive(inst, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{_flag(attribute)} {value!r}: must be a positive finite number")


def _non_negative(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ConfigError(f"{_flag(attribute)} {value!r}: must be a finite number >= 0")


def _port(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"--port {value!r}: must be a TCP port number, 1 to 65535")


@attrs.define(kw_only=True)
class ServeSettings:
    """Defaults are the safe ones: loopback only, no CORS, bounded bodies, queues and uploads."""

    host: str = "127.0.0.1"
    port: int = attrs.field(default=30010, validator=_port)
    api_key: Optional[str] = None  # when set, every /v1 route and /metrics need "Authorization: Bearer KEY"
    served_model_name: Optional[str] = None  # the id /v1/models shows and `model` must match (default: --model)
    max_batch_size: int = attrs.field(default=8, validator=_positive)
    batch_wait_ms: float = attrs.field(default=20.0, validator=_non_negative)
    # requests join a running batch at its next denoising step (diffcore.engine.stepping); False: start-only batches
    step_batching: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    max_queue: int = attrs.field(default=64, validator=_positive)
    request_timeout: float = attrs.field(default=600.0, validator=_positive)  # seconds, per request
    max_body_bytes: int = attrs.field(default=32 * 2**20, validator=_positive)  # whole request body
    max_upload_bytes: int = attrs.field(default=16 * 2**20, validator=_positive)  # one uploaded image
    max_upload_pixels: Optional[int] = attrs.field(default=None, validator=_positive)  # None: the engine's max_pixels
    file_ttl: float = attrs.field(default=3600.0, validator=_positive)  # seconds a `url` result / video is kept
    # the durable state (SQLite + files, store.py); None: a private temporary folder deleted when the app closes
    # (`diffcore serve` passes --state-dir, default store.default_state_dir(port))
    state_dir: Optional[str] = None
    max_jobs: int = attrs.field(default=256, validator=_positive)  # video jobs remembered (oldest finished dropped)
    cors_origins: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # () = CORS off
    # Host header names served besides 127.0.0.1 / localhost / [::1] / --host ("*": any); see serve.origin
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key (or DIFFCORE_API_KEY) must not be empty: an empty key is no key; set a real "
                              "one, or leave both unset to serve without a key")
