"""Server options (what `diffcore serve` flags set): network, limits, batching, security."""
from __future__ import annotations

from typing import Optional

import attrs

from ..errors import ConfigError


def _positive(inst, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"serve option {attribute.name}={value!r}: must be a positive number")


@attrs.define(kw_only=True)
class ServeSettings:
    """Defaults are the safe ones: loopback only, no CORS, bounded bodies, queues and uploads."""

    host: str = "127.0.0.1"
    port: int = attrs.field(default=30010, validator=_positive)
    api_key: Optional[str] = None  # when set, every /v1 route and /metrics need "Authorization: Bearer KEY"
    served_model_name: Optional[str] = None  # the id /v1/models shows and `model` must match (default: --model)
    max_batch_size: int = attrs.field(default=8, validator=_positive)
    batch_wait_ms: float = attrs.field(default=20.0, validator=attrs.validators.ge(0))
    max_queue: int = attrs.field(default=64, validator=_positive)
    request_timeout: float = attrs.field(default=600.0, validator=_positive)  # seconds, per request
    max_body_bytes: int = attrs.field(default=32 * 2**20, validator=_positive)  # whole request body
    max_upload_bytes: int = attrs.field(default=16 * 2**20, validator=_positive)  # one uploaded image
    max_upload_pixels: Optional[int] = attrs.field(default=None, validator=_positive)  # None: the engine's max_pixels
    file_ttl: float = attrs.field(default=3600.0, validator=_positive)  # seconds a `url` result / video is kept
    max_jobs: int = attrs.field(default=256, validator=_positive)  # video jobs remembered (oldest finished dropped)
    cors_origins: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # () = CORS off

    def __attrs_post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty; leave it out to serve without a key")
