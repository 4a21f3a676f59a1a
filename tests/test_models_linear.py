"""diffcore.models.linear: the oneDNN fast path equals F.linear (+ GELU) and steps aside for autograd.

The numerical tests run twice (``fastpath_mode``): with the oneDNN path where this CPU runs it, and with
every portable path forced (what an AVX2-only CPU gets for bf16)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffcore import fastpaths
from diffcore.models import linear as L


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_matches_torch(dtype, tol, activation, fastpath_mode):
    torch.manual_seed(0)
    layer = L.Linear(48, 40).to(dtype)
    x = torch.randn(2, 7, 48).to(dtype)
    with torch.inference_mode():
        got = L.linear(x, layer, activation)
        want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        if activation:
            want = F.gelu(want, approximate="tanh")
        # inference on the CPU takes the fast path where it works here, unless portable paths are forced
        fast = fastpath_mode == "fast" and L.ONEDNN and fastpaths.decision("onednn_linear", dtype)[0]
        assert L._onednn(x, layer.weight) == fast
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


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


needs_prepack = pytest.mark.skipif(not L.PREPACK, reason="oneDNN weight packing unavailable in this torch build")


@needs_prepack
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weight_is_exact_and_round_trips(dtype, fastpath_mode):
    torch.manual_seed(0)
    layer = L.Linear(64, 96).to(dtype).requires_grad_(False)
    plain = layer.weight.detach().clone()
    x = torch.randn(2, 9, 64).to(dtype)
    packs = fastpath_mode == "fast" and fastpaths.enabled("onednn_linear", dtype) and fastpaths.enabled("prepack", dtype)
    with torch.inference_mode():
        def want(x):  # what the oneDNN path gives with the plain weight, or the plain op
            if fastpaths.enabled("onednn_linear", dtype):
                return torch.ops.mkldnn._linear_pointwise(x, plain, layer.bias, "gelu", [], "tanh")
            return F.gelu(F.linear(x, plain, layer.bias), approximate="tanh")

        got = L.linear(x, layer, "gelu_tanh")  # packs on first use
        assert layer.weight.is_mkldnn == packs
        assert torch.equal(got, want(x))
        assert torch.equal(L.linear(x[:, :3], layer, "gelu_tanh"), want(x[:, :3]))  # other row counts too
        if packs:  # packed for 18 rows, exact for 6 too
            assert torch.equal(L.linear(x[:, :3], layer, "gelu_tanh"), want(x)[:, :3])
    assert torch.equal(layer.state_dict()["weight"], plain) and not layer.state_dict()["weight"].is_mkldnn
    import copy

    assert torch.equal(copy.deepcopy(layer).weight, plain)
    layer(x)
    layer.load_state_dict({"weight": plain * 2, "bias": layer.bias.detach().clone()})
    assert torch.equal(layer.weight, plain * 2)
    layer(x)
    assert layer.float().weight.dtype == torch.float32 and not layer.weight.is_mkldnn


@needs_prepack
def test_tied_or_trainable_weights_are_not_packed():
    a = L.Linear(8, 8).requires_grad_(False)
    b = L.Linear(8, 8)
    b.weight = a.weight  # tied
    trainable = L.Linear(8, 8)
    with torch.no_grad():
        for layer in (a, b, trainable):
            layer(torch.randn(2, 8))
    assert not a.weight.is_mkldnn and b.weight is a.weight and not trainable.weight.is_mkldnn


@needs_prepack
def test_packing_a_memory_mapped_weight_hands_its_pages_back(tmp_path):
    if not (fastpaths.enabled("onednn_linear", torch.float32) and fastpaths.enabled("prepack", torch.float32)):
        pytest.skip("fp32 weight packing is off here (DIFFCORE_PORTABLE or the CPU)")
    from safetensors.torch import save_file

    from diffcore.loader import load_into_module

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = L.Linear(1024, 2048)
            self.norm = nn.LayerNorm(1024)

    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in Net().state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    with torch.device("meta"):
        net = Net()
    load_into_module(net, [tmp_path / "w.safetensors"]).requires_grad_(False)
    x = torch.randn(4, 1024)
    with torch.inference_mode():
        want = torch.ops.mkldnn._linear_pointwise(x, net.proj.weight, net.proj.bias, "none", [], "")
        before = _rss_file_kb()  # the 8 MB weight was just read: resident
        got = net.proj(x)
        after = _rss_file_kb()
    assert net.proj.weight.is_mkldnn and torch.equal(got, want)
    assert before - after > 6 * 1024, (before, after)  # its file pages were dropped
    for name in ("proj.bias", "norm.weight", "norm.bias"):  # neighbours in the same mapping are intact
        assert torch.equal(net.state_dict()[name], state[name])
    assert torch.equal(net.state_dict()["proj.weight"], state["proj.weight"])
