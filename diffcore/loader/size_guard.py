"""A component config that would build an absurd model is refused before (or while) it is built.

Why: a ``config.json`` is data. ``"num_layers": 10**9`` made the loader build blocks on the meta device
for hours; ``"hidden_size": 10**7`` asks for a 10**14-parameter layer. Two cheap guards, both naming the
file: a depth count (any ``*layers`` / ``*blocks`` / ``depth`` entry, or one of its per-stage list) above ``MAX_DEPTH`` is refused
from the config alone (no real model has more than a few hundred); and the parameters created while the
module is built on the meta device are counted, the build stopping with the count as soon as it passes
the budget: ``DIFFCORE_MAX_PARAMS`` (default 10**11 per component; the largest real components hold about
3 * 10**10), so nothing past the budget is ever allocated.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError, ConfigFileError

MAX_DEPTH = 10_000
DEFAULT_MAX_PARAMS = 10**11
# Any key naming a count of layers or blocks, whatever the family's spelling (num_layers, n_layers,
# n_refiner_layers, video_connector_num_layers, num_blocks, depth, layers_per_block: an int or a list per stage).
_DEPTH = re.compile(r"(layers|blocks|depth|layers_per_block)$")


def max_params() -> int:
    raw = os.environ.get("DIFFCORE_MAX_PARAMS", "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PARAMS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"DIFFCORE_MAX_PARAMS={raw!r}: expected a positive number of parameters "
                          f"(default {DEFAULT_MAX_PARAMS:.0e})")
    return value


def check_depths(config: dict, file) -> None:
    for key, value in config.items():
        if not _DEPTH.search(str(key)):
            continue
        if isinstance(value, (list, tuple)):  # per stage (LTX-2's VAE: layers_per_block [4, 6, 6, 2, 2])
            value = max((v for v in value if isinstance(v, int) and not isinstance(v, bool)), default=0)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_DEPTH:
            raise ConfigFileError(f"{file}: {key}={value:,} is not a real model's depth (at most {MAX_DEPTH:,} here); "
                                  "the file is corrupt or crafted, re-download it", file=file, field=key)


class _Counter(TorchFunctionMode):
    def __init__(self, limit: int, file):
        super().__init__()
        self.limit, self.file, self.count = limit, file, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_meta and getattr(func, "__name__", "") in _FACTORIES:
            self.count += out.numel()
            if self.count > self.limit:
                raise ConfigFileError(
                    f"{self.file} describes a model of more than {self.count:,} parameters (counted while building "
                    f"it, before allocating anything), over the budget of {self.limit:,} per component; the file is "
                    "corrupt or crafted, or raise DIFFCORE_MAX_PARAMS if the model is really that large",
                    file=self.file)
        return out


_FACTORIES = {"empty", "zeros", "ones", "full", "randn", "rand", "tensor", "empty_strided", "arange", "linspace"}


@contextlib.contextmanager
def guarded_build(config: dict, file) -> Iterator[None]:
    """Refuse absurd depths from ``config``, then count the parameters the build creates on the meta device."""
    check_depths(config, file)
    with _Counter(max_params(), file):
        yield
