"""Check a family's checkpoint-layout conversion against a reference converter (diffusers', in the tests).

Every conversion moves whole rows, so tensors whose rows carry unique ids (``tagged``) show where each row
went; real widths cost little because each row is one number.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


def tagged(shapes: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """{key: float64 tensor of ``shape``} whose elements are unique ids across all keys."""
    out, n = {}, 0
    for key, shape in shapes.items():
        size = torch.Size(shape).numel()
        out[key] = torch.arange(n, n + size, dtype=torch.float64).reshape(shape)
        n += size
    return out


def assert_converts_like(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], layouts: Sequence,
                         layout) -> None:
    """Seen through ``layouts``, ``state`` is read as ``layout`` and holds exactly ``reference``'s keys and tensors."""
    from diffcore.loader import key_layouts

    view = key_layouts.view(list(state), lambda k: tuple(state[k].shape), state.__getitem__, layouts)
    assert view.layout is layout, view.layout
    assert sorted(view.keys) == sorted(reference)
    for k, want in reference.items():
        assert view.shape(k) == tuple(want.shape) and torch.equal(view.tensor(k), want), k
