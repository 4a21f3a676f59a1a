"""Record the dtypes every op produces, so tests can prove a hot path never touches float64."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class DtypeRecorder(TorchDispatchMode):
    """``with DtypeRecorder() as rec: model(...)``; then ``rec.dtypes`` holds every output dtype seen."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out
