"""diffcore.models.attention's bf16 CPU path (per-head GEMMs), at a small FLUX-like shape."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcore import fastpaths
from diffcore.models import attention as attn

FAST = ("bf16_attention", torch.bfloat16)  # the decision key; tests set it to prove the routing on any CPU


def _sdpa64(q, k, v, mask=None):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 48, 3, 32, generator=g) * 1.5).bfloat16() for _ in range(3)]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding"])
def test_bf16_cpu_path_matches_float64_like_flash(qkv, masked):
    q, k, v = qkv
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 48, dtype=torch.bool)
        mask[1, ..., 5:20] = False
    ref = _sdpa64(q, k, v, mask)
    got = attn._bf16_cpu(q, k, v, attn_mask=mask)
    flash = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2)
    err, flash_err = (got.double() - ref).abs(), (flash.double() - ref).abs()
    print(f"bf16 attention mean|err| {err.mean():.2e} (flash {flash_err.mean():.2e}), max {err.max():.2e}")
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert err.mean() <= 4 * flash_err.mean() and err.max() <= 0.05  # bf16 scores: ~3x flash here


def test_default_backend_routes_single_threaded_cpu_bf16_only(qkv, monkeypatch, machine_fastpaths):
    q, k, v = qkv
    flash = lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv)).transpose(1, 2)  # noqa: E731
    assert attn.get_backend() == "sdpa"
    monkeypatch.setitem(fastpaths._decisions, FAST, (True, "test"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attn.attention(q, k, v), attn._bf16_cpu(q, k, v))
        q32, k32, v32 = (t.float() for t in qkv)  # fp32 stays on torch SDPA
        expected = F.scaled_dot_product_attention(q32.transpose(1, 2), k32.transpose(1, 2), v32.transpose(1, 2))
        assert torch.equal(attn.attention(q32, k32, v32), expected.transpose(1, 2))
        monkeypatch.setattr(attn, "_BF16_CPU_MAX_SCORES", 48 * 48 - 1)  # too long -> flash SDPA
        assert torch.equal(attn.attention(q, k, v), flash())
        monkeypatch.undo()
        monkeypatch.setitem(fastpaths._decisions, FAST, (True, "test"))
        torch.set_num_threads(2)  # multi-threaded -> flash SDPA
        assert torch.equal(attn.attention(q, k, v), flash())
    finally:
        torch.set_num_threads(threads)


def test_taken_only_where_the_cpu_has_native_bf16_gemms(qkv, fastpath_mode):
    """Without a forced decision: the per-head path runs only with AVX512-BF16 and no AMX, and never
    when portable paths are forced; the result is within bf16 noise of float64 either way."""
    q, k, v = qkv
    cpu = fastpaths.cpu_features()
    expect = fastpath_mode == "fast" and cpu["avx512_bf16"] and cpu["mkldnn_bf16"] and not cpu["amx_tile"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert attn._use_bf16_cpu(q, k, v, None) == expect
        got = attn.attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert (got.double() - _sdpa64(q, k, v)).abs().max() <= 0.05
