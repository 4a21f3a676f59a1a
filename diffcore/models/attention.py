"""One attention entry point for every model, so backends and sequence parallelism (Ulysses) plug in here.

Layout is diffusers' dispatch layout: ``(batch, seq, heads, head_dim)`` in and out.

Which backend runs is an engine choice: the pipeline sets the ``BACKEND`` context variable around its
forward (``use_backend``), so two pipelines with different backends in one process, or in threads,
never see each other's choice. Outside any pipeline the default is ``sdpa``.

The default backend ``sdpa`` is ``F.scaled_dot_product_attention``, except for single-threaded bf16
on CPUs with AVX512-BF16 and no AMX, where ``_bf16_cpu`` is faster (see there; ``diffcore.fastpaths``
decides, ``DIFFCORE_PORTABLE=bf16_attention`` turns it off).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import attrs
import torch
import torch.nn.functional as F

from diffcore import fastpaths
from diffcore.errors import ConfigError

if TYPE_CHECKING:
    from ..parallel.ulysses import SeqShard

AttentionFn = Callable[..., torch.Tensor]


_BF16_CPU_MAX_SCORES = 1 << 23  # per-head (S_q, S_k) score buffer limit: 2 x 16 MB; longer -> flash SDPA


def _bf16_cpu(query, key, value, attn_mask=None, scale=None):
    """bf16 attention one (batch, head) at a time: ``addmm`` for the scores, ``softmax``, ``mm`` by V.

    Why: torch's CPU flash kernel is no faster in bf16 than in fp32 at diffusion sizes, while whole-head
    bf16 oneDNN GEMMs run near the bf16 matmul peak. Speed-up vs flash SDPA on the 2-core AVX512-BF16
    EPYC, one thread, median of 9 interleaved pairs: FLUX 512 tokens x 6 heads x 128 2.1x, 320 tokens
    with a key-padding mask 1.8x, 1024 tokens x 1 head (VAE) 1.4-1.7x, 9 frames x 1024 (Wan VAE) 2.0x,
    Wan 2304 x 4 heads 2.0x (2304 x 512 cross 1.9x), 4608 tokens 1.4x; the bench FLUX bf16 step 1.09x
    (15 pairs). fp32 is slower this way (0.9x) and stays on SDPA. Only single-threaded runs take it:
    at 2 threads on that (shared, busy) VM its many short parallel regions were ~8x slower than flash,
    and an idle multi-core machine was not available to measure.

    Accuracy: scores are rounded to bf16 before the softmax (flash keeps them fp32), so the mean error
    vs float64 is ~2x flash's (1.8e-3 vs 9.4e-4 at the FLUX shape), well inside bf16's own noise: the
    bench FLUX bf16 step differs from the flash one by 0.4% (relative L2) while both are 17.8% from
    fp32, and end-to-end bf16 PSNR vs diffusers stays FLUX 50.1 -> 50.2, Qwen 48.2 -> 48.3, Wan 43.2 -> 43.2 dB.
    Two (S_q, S_k) buffers are reused for every head; ``attn_mask`` must be bool (True = attend).
    """
    batch, s_q, heads, dim = query.shape
    s_k = key.shape[1]
    scale = scale if scale is not None else dim ** -0.5
    out = query.new_empty(batch, s_q, heads, value.shape[-1])
    scores, probs = query.new_empty(s_q, s_k), query.new_empty(s_q, s_k)
    bias = None  # the mask as a 0 / -inf addend of the score GEMM (faster than a masked_fill pass)
    if attn_mask is not None:
        bias = query.new_zeros(attn_mask.shape).masked_fill_(~attn_mask, float("-inf"))
        bias = bias.expand(batch, heads, s_q, s_k)
    for b in range(batch):
        for h in range(heads):
            # alpha scales in fp32 before the bf16 rounding; beta=0 ignores the buffer's old contents
            if bias is None:
                torch.addmm(scores, query[b, :, h], key[b, :, h].T, beta=0, alpha=scale, out=scores)
            else:
                torch.addmm(bias[b, h], query[b, :, h], key[b, :, h].T, alpha=scale, out=scores)
            torch.softmax(scores, -1, out=probs)
            torch.mm(probs, value[b, :, h], out=out[b, :, h])
    return out


def _use_bf16_cpu(query, key, value, attn_mask) -> bool:
    # Measured where bf16 GEMMs are native but AMX is not (AMD Zen 4/5): fastpaths checks for exactly that.
    return (query.device.type == "cpu" and torch.get_num_threads() == 1
            and query.dtype == key.dtype == value.dtype == torch.bfloat16
            and (attn_mask is None or attn_mask.dtype == torch.bool)
            and query.shape[1] * key.shape[1] <= _BF16_CPU_MAX_SCORES and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
            and fastpaths.enabled("bf16_attention", torch.bfloat16))


def _sdpa(query, key, value, attn_mask=None, scale=None):
    if _use_bf16_cpu(query, key, value, attn_mask):
        return _bf16_cpu(query, key, value, attn_mask=attn_mask, scale=scale)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


def _math(query, key, value, attn_mask=None, scale=None):
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-1, -2)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return (scores.softmax(-1) @ v).transpose(1, 2)


@attrs.frozen
class Backend:
    """A resolved backend: its name (what ``get_backend`` says) and the function that runs."""

    name: str
    fn: AttentionFn = attrs.field(repr=False)


# The built-ins plus what code registers itself with ``register_backend``; plugins' backends are not copied
# here: a pipeline resolves its backend from its own plugin registry (``resolve_backend``).
_BACKENDS: dict[str, AttentionFn] = {"sdpa": _sdpa, "math": _math}
BACKEND: contextvars.ContextVar[Backend] = contextvars.ContextVar("diffcore_attention_backend",
                                                                  default=Backend("sdpa", _sdpa))


def register_backend(name: str, fn: AttentionFn) -> None:
    """Add an attention implementation for ``use_backend`` in this process (plugins register theirs with the
    ``register_attention_backends`` hook instead; a pipeline finds them in its registry)."""
    _BACKENDS[name] = fn


def available_backends(registry=None) -> list[str]:
    names = set(_BACKENDS)
    if registry is not None:
        names.update(registry.names("attention_backends"))
    return sorted(names)


def resolve_backend(name: str, registry=None) -> Backend:
    """The backend ``name``: built in, registered in this process, or from ``registry``'s plugins; otherwise a
    ConfigError (a ValueError) listing the alternatives."""
    if name in _BACKENDS:
        return Backend(name, _BACKENDS[name])
    if registry is not None and name in registry.names("attention_backends"):
        return Backend(name, registry.get("attention_backends", name))
    raise ConfigError(f"unknown attention backend {name!r} (attention_backend); available: "
                      f"{', '.join(available_backends(registry))}")


def check_backend(name: str, registry=None) -> str:
    """``name`` if ``resolve_backend`` finds it."""
    return resolve_backend(name, registry).name


@contextlib.contextmanager
def use_backend(name: str, registry=None) -> Iterator[None]:
    """Run the enclosed code (in this thread / context only) with backend ``name``."""
    token = BACKEND.set(resolve_backend(name, registry))
    try:
        yield
    finally:
        BACKEND.reset(token)


def get_backend() -> str:
    """The name of the backend active in the current context."""
    return BACKEND.get().name


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    shard: Optional["SeqShard"] = None,
) -> torch.Tensor:
    """Scaled dot-product attention over ``(B, S, H, D)`` tensors.

    ``attn_mask`` is broadcastable to ``(B, H, S_q, S_k)``: bool (True = attend) or additive float.
    ``shard`` (sequence parallelism, from ``diffcore.parallel.sequence_shard``): q/k/v are this rank's
    sequence shard, each optionally preceded by tokens every rank holds whole (joint attention's text);
    the backend then runs on all tokens of this rank's heads, between two all-to-alls (Ulysses), and
    ``attn_mask`` refers to the unsharded sequence. Without ``shard`` the call is local (cross-attention).
    """
    fn = BACKEND.get().fn
    if shard is not None:
        from ..parallel.ulysses import ulysses_attention

        return ulysses_attention(fn, query, key, value, attn_mask, scale, shard)
    return fn(query, key, value, attn_mask=attn_mask, scale=scale)
