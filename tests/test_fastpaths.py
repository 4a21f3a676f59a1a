"""diffcore.fastpaths: each CPU fast path is taken only where it works, and the plain op runs otherwise.

This machine may have AVX512-BF16 (every fast path works) or only AVX2 (oneDNN's bf16 GEMMs fail there).
The AVX2 behaviour is proven on either kind: the oneDNN ops are replaced by stand-ins that raise the
exact errors an AVX2 CPU gives, and the layers must fall back, give the plain op's result and
remember the decision.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffcore import fastpaths
from diffcore.errors import ConfigError
from diffcore.models import linear as L

# Every test here checks which path is chosen, so each sees this machine's choices even when the
# whole suite runs with the portable paths forced (DIFFCORE_PORTABLE=1).
pytestmark = pytest.mark.usefixtures("machine_fastpaths")

AVX2_LINEAR = "could not create a primitive descriptor for the inner product forward propagation primitive"
AVX2_REORDER = ("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, "
                "avx512vl and avx512dq")


@pytest.fixture
def fresh():
    """Decisions made inside the test are forgotten afterwards (the real ones are re-made on demand)."""
    fastpaths.reset()
    yield
    fastpaths.reset()


class Raising:
    """A stand-in for a oneDNN op that raises like an AVX2 CPU does (for inputs with ``min_rows`` rows or more)."""

    def __init__(self, message: str, real=None, min_rows: int = 0):
        self.message, self.real, self.min_rows, self.calls = message, real, min_rows, 0

    def __call__(self, x, *args):
        self.calls += 1
        if x.numel() // x.shape[-1] >= self.min_rows:
            raise RuntimeError(self.message)
        return self.real(x, *args)


def _reference(x, layer, activation=None):
    y = F.linear(x, layer.weight.detach(), layer.bias)
    return F.gelu(y, approximate="tanh") if activation else y


def test_report_names_the_cpu_and_every_path():
    report = fastpaths.report()
    json.dumps(report)  # the benchmark harness stores it as is
    assert report["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(report["paths"]) == set(fastpaths.PATHS)
    for path, entry in report["paths"].items():
        for dtype in ("float32", "bfloat16"):
            assert isinstance(entry[dtype]["fast"], bool) and entry[dtype]["why"], (path, dtype)
    assert report["paths"]["bf16_attention"]["float32"]["fast"] is False  # bf16-only by design


def test_portable_switch_forces_every_path_and_is_scoped():
    with fastpaths.portable():
        assert fastpaths.forced() == frozenset(fastpaths.PATHS)
        assert not any(fastpaths.enabled(p, d) for p in fastpaths.PATHS for d in (torch.float32, torch.bfloat16))
        assert all(not v[d]["fast"] and "forced" in v[d]["why"] for v in fastpaths.report()["paths"].values()
                   for d in ("float32", "bfloat16"))
        with fastpaths.portable(["prepack"]):
            assert fastpaths.forced() == {"prepack"}
    assert fastpaths.enabled("onednn_linear", torch.float32) == fastpaths.decision("onednn_linear", torch.float32)[0]
    with pytest.raises(ConfigError, match="unknown fast path.*accepted"):
        with fastpaths.portable(["nope"]):
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_failed_trial_call_falls_back_and_is_cached(fresh, monkeypatch, dtype):
    """What an AVX2 CPU does to oneDNN's bf16 linear: the trial fails, F.linear runs, the trial is not repeated."""
    fake = Raising(AVX2_LINEAR)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fake)
    torch.manual_seed(0)
    layer = L.Linear(16, 24).to(dtype).requires_grad_(False)
    x = torch.randn(5, 16).to(dtype)
    with torch.inference_mode():
        got = layer(x)
        assert fake.calls == 1  # the trial call only
        assert torch.equal(got, _reference(x, layer))
        assert torch.equal(L.linear(x, layer, "gelu_tanh"), _reference(x, layer, "gelu_tanh"))
        assert fake.calls == 1  # decided once, not per call
    assert not layer.weight.is_mkldnn  # no packing either: the weight is used as stored
    taken, why = fastpaths.decision("onednn_linear", dtype)
    assert not taken and AVX2_LINEAR in why
    entry = fastpaths.report()["paths"]["onednn_linear"][str(dtype).removeprefix("torch.")]
    assert entry == {"fast": False, "why": why}


def test_a_call_failing_after_a_good_trial_switches_the_path_off(fresh, monkeypatch):
    """The trial passes (small input) but a real call raises: that call still returns F.linear's result,
    the layer is unpacked and later calls go straight to F.linear."""
    fake = Raising(AVX2_LINEAR, real=torch.ops.mkldnn._linear_pointwise, min_rows=50)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fake)
    torch.manual_seed(0)
    layer = L.Linear(16, 24).requires_grad_(False)  # fp32: oneDNN runs it on AVX2 and AVX-512 alike
    x = torch.randn(64, 16)
    with torch.inference_mode():
        got = layer(x)
        assert torch.equal(got, _reference(x, layer))
        calls = fake.calls
        assert torch.equal(layer(x), got) and fake.calls == calls
    taken, why = fastpaths.decision("onednn_linear", torch.float32)
    assert not taken and why.startswith("a call failed") and AVX2_LINEAR in why
    assert not layer.weight.is_mkldnn


def test_bad_input_is_not_blamed_on_the_fast_path(fresh):
    """A shape error raises as usual and leaves the decision alone."""
    layer = L.Linear(8, 4).requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(2, 8))
        before = fastpaths.decision("onednn_linear", torch.float32)
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 5))
    assert fastpaths.decision("onednn_linear", torch.float32) == before


def test_failed_weight_packing_keeps_the_plain_weight(fresh, monkeypatch):
    if not fastpaths.decision("onednn_linear", torch.bfloat16)[0]:
        pytest.skip("oneDNN bf16 linear does not run on this CPU (covered by the trial-failure test)")
    fake = Raising(AVX2_REORDER)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", fake)
    fastpaths.reset()
    torch.manual_seed(0)
    layer = L.Linear(16, 24).bfloat16().requires_grad_(False)
    x = torch.randn(5, 16).bfloat16()
    with torch.inference_mode():
        got = layer(x)
        want = torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    assert torch.equal(got, want) and not layer.weight.is_mkldnn
    taken, why = fastpaths.decision("prepack", torch.bfloat16)
    assert not taken and AVX2_REORDER in why and fake.calls == 1
    assert fastpaths.decision("onednn_linear", torch.bfloat16)[0]  # the GEMM itself still runs on oneDNN


def test_failed_onednn_convolution_falls_back(fresh, monkeypatch):
    from diffcore.models.wan_vae_blocks import CausalConv3d

    fake = Raising("could not create a primitive descriptor for a convolution forward propagation primitive")
    monkeypatch.setattr(torch.ops.aten, "mkldnn_convolution", fake)
    torch.manual_seed(0)
    conv = CausalConv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)).bfloat16().requires_grad_(False)
    x = torch.randn(1, 8, 3, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        got = conv(x)
        want = F.conv3d(x, conv.weight, conv.bias, padding=(0, 1, 1))
    assert (got.float() - want.float()).abs().max() <= 1e-2 and fake.calls == 1
    assert not fastpaths.enabled("channels_last_conv", torch.bfloat16)


def test_forced_portable_bf16_attention_is_flash_sdpa(monkeypatch):
    from diffcore.models import attention as attn

    monkeypatch.setitem(fastpaths._decisions, ("bf16_attention", torch.bfloat16), (True, "test"))
    q, k, v = (torch.randn(1, 16, 2, 8).bfloat16() for _ in range(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attn.attention(q, k, v), attn._bf16_cpu(q, k, v))
        with fastpaths.portable(["bf16_attention"]):
            flash = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            assert torch.equal(attn.attention(q, k, v), flash)
    finally:
        torch.set_num_threads(threads)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_environment_switch_in_a_fresh_process():
    """DIFFCORE_PORTABLE=1: every path reports forced, a bf16 Linear is exactly F.linear and packs nothing."""
    code = (
        "import json, torch, torch.nn.functional as F\n"
        "from diffcore import fastpaths\nfrom diffcore.models.linear import Linear\n"
        "torch.manual_seed(0)\nlayer = Linear(16, 24).bfloat16().requires_grad_(False)\nx = torch.randn(4, 16).bfloat16()\n"
        "with torch.inference_mode():\n    y = layer(x)\n"
        "assert torch.equal(y, F.linear(x, layer.weight, layer.bias)) and not layer.weight.is_mkldnn\n"
        "print(json.dumps(fastpaths.report()))\n"
    )
    proc = _run(code, DIFFCORE_PORTABLE="1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["portable"] == sorted(fastpaths.PATHS)
    assert not any(v[d]["fast"] for v in report["paths"].values() for d in ("float32", "bfloat16"))


@pytest.fixture
def reread_environment():
    yield fastpaths.reload_environment
    fastpaths.reload_environment()  # the real environment again for later tests


def test_environment_switch_values(monkeypatch, reread_environment):
    monkeypatch.setenv("DIFFCORE_PORTABLE", "onednn_linear, prepack")
    reread_environment()
    assert fastpaths.forced() == {"onednn_linear", "prepack"}
    assert not fastpaths.enabled("prepack", torch.float32)
    monkeypatch.setenv("DIFFCORE_PORTABLE", "0")
    assert fastpaths.forced() == {"onednn_linear", "prepack"}  # read once per process
    reread_environment()
    assert fastpaths.forced() == frozenset()
    monkeypatch.setenv("DIFFCORE_PORTABLE", "linear")
    reread_environment()
    with pytest.raises(ConfigError, match="DIFFCORE_PORTABLE='linear': unknown fast path.*onednn_linear"):
        fastpaths.forced()
    monkeypatch.undo()


# oneDNN and ATen both take a CPU-feature ceiling from the environment: with these, this machine's oneDNN
# raises exactly what an AVX2-only CPU raises (checked below), so the real fallback runs, not a stand-in.
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "DIFFCORE_PORTABLE": "0"}


def test_emulated_avx2_cpu_runs_every_bf16_path():
    code = (
        "import json, torch, torch.nn.functional as F\n"
        "from diffcore import fastpaths\nfrom diffcore.models.linear import Linear, linear\n"
        "from diffcore.models.wan_vae_blocks import CausalConv3d\n"
        "torch.manual_seed(0)\nlayer = Linear(16, 24).bfloat16().requires_grad_(False)\nx = torch.randn(4, 16).bfloat16()\n"
        "conv = CausalConv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)).bfloat16().requires_grad_(False)\n"
        "v = torch.randn(1, 8, 2, 5, 5).bfloat16().contiguous(memory_format=torch.channels_last_3d)\n"
        "with torch.inference_mode():\n"
        "    y, g, c = layer(x), linear(x, layer, 'gelu_tanh'), conv(v)\n"
        "    raw = None\n"
        "    try:\n        torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, 'none', [], '')\n"
        "    except RuntimeError as exc:\n        raw = str(exc)\n"
        "assert torch.equal(y, F.linear(x, layer.weight, layer.bias)) and not layer.weight.is_mkldnn\n"
        "assert torch.equal(g, F.gelu(F.linear(x, layer.weight, layer.bias), approximate='tanh'))\n"
        "assert torch.equal(c, F.conv3d(v, conv.weight, conv.bias, padding=(0, 1, 1)))\n"
        "print(json.dumps({'raw': raw, 'report': fastpaths.report()}))\n"
    )
    proc = _run(code, **AVX2_ENV)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["raw"] is None:
        pytest.skip("this torch build's oneDNN ignores ONEDNN_MAX_CPU_ISA: no AVX2 emulation here")
    assert AVX2_LINEAR in out["raw"]  # the emulation is faithful: the AVX2 error itself
    report = out["report"]
    assert report["cpu"]["capability"] == "AVX2"
    for path in ("onednn_linear", "prepack", "channels_last_conv"):
        assert report["paths"][path]["bfloat16"]["fast"] is False
        assert report["paths"][path]["bfloat16"]["why"].startswith("trial call failed")
        assert report["paths"][path]["float32"]["fast"] is True  # fp32 oneDNN works on AVX2
    assert report["paths"]["bf16_attention"]["bfloat16"]["fast"] is False
