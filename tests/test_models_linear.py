"""diffcore.models.linear: the oneDNN fast path equals F.linear (+ GELU) and steps aside for autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcore.models import linear as L


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_matches_torch(dtype, tol, activation):
    torch.manual_seed(0)
    layer = L.Linear(48, 40).to(dtype)
    x = torch.randn(2, 7, 48).to(dtype)
    with torch.inference_mode():
        got = L.linear(x, layer, activation)
        want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        if activation:
            want = F.gelu(want, approximate="tanh")
        assert L._onednn(x, layer.weight) == L.ONEDNN  # inference on the CPU takes the fast path when available
    assert got.dtype == dtype and got.shape == (2, 7, 40)
    assert (got.double() - want).abs().max().item() <= tol


def test_autograd_and_other_layouts_fall_back():
    layer = L.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    assert not L._onednn(x, layer.weight)
    L.linear(x, layer, "gelu_tanh").sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.inference_mode():
        half = L.Linear(8, 4).half()
        assert not L._onednn(torch.randn(3, 8).half(), half.weight)
    with pytest.raises(ValueError):
        L.linear(x, layer, "relu")


def test_state_dict_names_are_nn_linear():
    assert list(L.Linear(3, 2).state_dict()) == list(torch.nn.Linear(3, 2).state_dict())
