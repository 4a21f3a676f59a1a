"""Which CPU fast paths this process takes: decided once per path and dtype, with the plain op as fallback.

Why: the fast paths call oneDNN ops directly (``torch.ops.mkldnn._linear_pointwise``, weight re-layout,
``mkldnn_convolution``), which skip the CPU-feature checks PyTorch's own dispatch does. On an AVX2-only
CPU their bf16 kernels raise "could not create a primitive descriptor for the inner product forward
propagation primitive" / "bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and
avx512dq", where ``F.linear`` simply works. So each path is taken only after

1. a capability check (the op exists in this torch build; for speed-only paths, the CPU has the
   features the speed-up was measured on), and
2. a tiny trial call that must succeed and match the plain op,

both done once per (path, dtype) and cached. A real call that still fails later is reported with
``failed()``: the path is switched off for that dtype for the rest of the process.

``DIFFCORE_PORTABLE=1`` (or ``all``) forces every portable path; ``DIFFCORE_PORTABLE=onednn_linear,prepack``
forces only the named ones (read once per process). In process, ``with fastpaths.portable(): ...`` does the same for the current
thread / context (a ``contextvars`` value, so concurrent requests are unaffected). ``report()`` says
what was chosen and why (the benchmark harness stores it with its results).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ENV = "DIFFCORE_PORTABLE"
PATHS = {
    "onednn_linear": "diffcore.models.linear: oneDNN GEMM (GELU fused into it) instead of F.linear",
    "prepack": "diffcore.models.linear: weights re-laid out once in oneDNN's blocked format",
    "bf16_attention": "diffcore.models.attention: bf16 attention as per-head GEMMs instead of flash SDPA",
    "channels_last_conv": "3-D causal VAE decoder: channels-last layout, convolutions sent straight to oneDNN",
}
_DTYPES = (torch.float32, torch.bfloat16)

_override: contextvars.ContextVar[Optional[frozenset]] = contextvars.ContextVar("diffcore_portable", default=None)
_decisions: dict[tuple[str, torch.dtype], tuple[bool, str]] = {}
_lock = threading.Lock()


def _parse(value: str) -> frozenset:
    value = value.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return frozenset()
    if value in ("1", "true", "yes", "on", "all"):
        return frozenset(PATHS)
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(names - set(PATHS))
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"{ENV}={value!r}: unknown fast path(s) {', '.join(unknown)}; accepted: 1, all, or a "
                          f"comma-separated list of {', '.join(PATHS)}")
    return names


_env_forced: Optional[frozenset] = None  # DIFFCORE_PORTABLE, parsed on first use (os.environ costs ~1 us a read)


def forced() -> frozenset:
    """The paths forced portable here: by ``portable()`` if active, else by ``DIFFCORE_PORTABLE`` (read
    once per process; ``reload_environment()`` reads it again)."""
    global _env_forced
    value = _override.get()
    if value is not None:
        return value
    if _env_forced is None:
        _env_forced = _parse(os.environ.get(ENV, ""))
    return _env_forced


def reload_environment() -> None:
    """Read ``DIFFCORE_PORTABLE`` again at the next check (after changing it in this process)."""
    global _env_forced
    _env_forced = None


@contextlib.contextmanager
def portable(paths: bool | Iterable[str] = True) -> Iterator[None]:
    """Force portable paths inside the block (``True``: all, ``False``: none, or an iterable of names)."""
    if paths is True:
        value = frozenset(PATHS)
    elif paths is False:
        value = frozenset()
    else:
        value = _parse(",".join(paths)) if not isinstance(paths, str) else _parse(paths)
    token = _override.set(value)
    try:
        yield
    finally:
        _override.reset(token)


# ------------------------------------------------------------------ capability checks and trial calls
def cpu_features() -> dict:
    """What torch reports about this CPU (also useful to pick a default precision)."""
    cpu = torch.cpu
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "amx_tile": bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
    }


def _has(*ops: str) -> Optional[str]:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    for op in ops:
        namespace, name = op.split(".")
        if not hasattr(getattr(torch.ops, namespace), name):
            return f"torch.ops.{op} is missing in this torch build"
    return None


def _bf16_attention_capable(dtype) -> Optional[str]:
    # A speed choice, not a correctness one: measured faster only where bf16 GEMMs are native and AMX is
    # absent (AMD Zen 4/5); with AMX torch's flash kernel uses AMX tiles; on AVX2 bf16 GEMMs are emulated.
    if dtype != torch.bfloat16:
        return "bf16 only (fp32 is faster on flash SDPA)"
    features = cpu_features()
    if not (features["avx512_bf16"] and features["mkldnn_bf16"]):
        return "no native bf16 GEMMs here (AVX512-BF16 missing, or oneDNN may not use it)"
    if features["amx_tile"]:
        return "the CPU has AMX (torch's flash kernel uses it)"
    return None


def _conv_capable(dtype) -> Optional[str]:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    return None if torch.backends.mkldnn.enabled else "torch.backends.mkldnn.enabled is False"


_CAPABLE: dict[str, Callable[[torch.dtype], Optional[str]]] = {
    "onednn_linear": lambda dtype: _has("mkldnn._linear_pointwise"),
    "prepack": lambda dtype: _has("mkldnn._linear_pointwise", "mkldnn._reorder_linear_weight"),
    "bf16_attention": _bf16_attention_capable,
    "channels_last_conv": _conv_capable,
}


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    err = (got.double() - want.double()).abs().max().item()
    if not err <= tol * max(1.0, want.double().abs().max().item()):
        raise RuntimeError(f"trial result differs from the plain op by {err:.3g}")


def _trial_inputs(dtype, *shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(dtype)


def _trial_linear(dtype) -> None:
    x, w, b = _trial_inputs(dtype, 3, 16), _trial_inputs(dtype, 24, 16), _trial_inputs(dtype, 24)
    with torch.inference_mode():
        want = F.linear(x.double(), w.double(), b.double())
        _close(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), want, dtype)
        _close(torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh"), F.gelu(want, approximate="tanh"), dtype)


def _trial_prepack(dtype) -> None:
    x, w, b = _trial_inputs(dtype, 3, 16), _trial_inputs(dtype, 24, 16), _trial_inputs(dtype, 24)
    with torch.inference_mode():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        _close(got, F.linear(x.double(), w.double(), b.double()), dtype)
        _close(packed.to_dense(), w, dtype)


def _trial_bf16_attention(dtype) -> None:
    q, k = _trial_inputs(dtype, 8, 16), _trial_inputs(dtype, 8, 16)
    with torch.inference_mode():
        scores = torch.addmm(q.new_empty(8, 8), q, k.T, beta=0, alpha=0.25)
        _close(scores, (q.double() @ k.double().T) * 0.25, dtype)


def _trial_conv(dtype) -> None:
    x = _trial_inputs(dtype, 1, 8, 2, 5, 5).contiguous(memory_format=torch.channels_last_3d)
    w = _trial_inputs(dtype, 8, 8, 1, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    b = _trial_inputs(dtype, 8)
    with torch.inference_mode():
        got = torch.ops.aten.mkldnn_convolution(x, w, b, (0, 1, 1), (1, 1, 1), (1, 1, 1), 1)
        _close(got, F.conv3d(x.double(), w.double(), b.double(), padding=(0, 1, 1)), dtype)


_TRIALS: dict[str, Callable[[torch.dtype], None]] = {
    "onednn_linear": _trial_linear,
    "prepack": _trial_prepack,
    "bf16_attention": _trial_bf16_attention,
    "channels_last_conv": _trial_conv,
}


# ------------------------------------------------------------------ decisions
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _decide(path: str, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in _DTYPES:
        return False, f"{dtype} has no fast path"
    reason = _CAPABLE[path](dtype)
    if reason is not None:
        return False, reason
    try:
        _TRIALS[path](dtype)
    except Exception as exc:  # noqa: BLE001 - any failure means: take the plain op
        log.info("fast path %s (%s) off: trial call failed: %s", path, dtype, exc)
        return False, f"trial call failed: {_first_line(exc)}"
    return True, "capability check and trial call passed"


def decision(path: str, dtype: torch.dtype) -> tuple[bool, str]:
    """``(taken, why)`` for ``path`` at ``dtype`` on this machine, ignoring the portable switch."""
    key = (path, dtype)
    found = _decisions.get(key)
    if found is None:
        if path not in PATHS:
            raise KeyError(f"unknown fast path {path!r}; known: {', '.join(PATHS)}")
        with _lock:
            found = _decisions.get(key)
            if found is None:
                found = _decisions[key] = _decide(path, dtype)
    return found


def enabled(path: str, dtype: torch.dtype) -> bool:
    """Whether to take ``path`` for tensors of ``dtype`` (the check every fast path calls)."""
    return path not in forced() and decision(path, dtype)[0]


def failed(path: str, dtype: torch.dtype, exc: BaseException) -> None:
    """A real call of ``path`` failed where the plain op works: never take it again for ``dtype``."""
    log.warning("fast path %s (%s) failed and is switched off for this process: %s", path, dtype, exc)
    with _lock:
        _decisions[(path, dtype)] = (False, f"a call failed: {_first_line(exc)}")


def reset() -> None:
    """Forget every decision (tests; the next check decides again)."""
    with _lock:
        _decisions.clear()


def report() -> dict:
    """What this process takes, per path and dtype, and why; plus the CPU as torch reports it."""
    force = forced()
    paths = {}
    for path, what in PATHS.items():
        per_dtype = {}
        for dtype in _DTYPES:
            taken, why = decision(path, dtype)
            if path in force:
                taken, why = False, f"forced portable ({ENV} or fastpaths.portable())"
            per_dtype[str(dtype).removeprefix("torch.")] = {"fast": taken, "why": why}
        paths[path] = {"what": what, **per_dtype}
    return {"cpu": cpu_features(), "torch": torch.__version__, "portable": sorted(force), "paths": paths}
