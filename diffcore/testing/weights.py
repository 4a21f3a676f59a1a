"""Weight perturbation and comparison metrics for parity tests.

Why perturb: freshly initialised models are a poor test oracle. Norm scales are exactly 1, most biases
and many projections (adaLN gates, zero-init output layers) are exactly 0, so a forgotten bias, a
swapped scale/shift or an ignored conditioning path produces the *same* output as the correct code.
``perturb_`` moves every parameter off those special values, deterministically, so parity tests
actually exercise each weight.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["perturb_", "psnr", "max_abs_diff", "cosine"]


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb ``module``'s parameters in place, deterministically; returns ``module``.

    Per parameter, in ``named_parameters()`` order (tied weights are visited once):

    * all zeros, or name ends with ``bias``: ``+= N(0, scale)``
    * all ones (norm scales): ``+= N(0, 4 * scale)`` (i.e. ``1 + N(0, 0.2)`` at the default scale)
    * anything else: ``+= N(0, 0.02 * scale / 0.05)``

    Noise is drawn on the CPU in float32 from a private ``torch.Generator`` seeded with ``seed``, so the
    result is independent of the global RNG, the parameter dtype and the device. Parameters on the meta
    device are skipped.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for name, param in module.named_parameters():
        if param.device.type == "meta" or param.numel() == 0:
            continue
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        data = param.detach()
        if name.endswith("bias") or not bool(data.any()):
            std = scale
        elif bool((data == 1).all()):
            std = 4.0 * scale
        else:
            std = 0.02 * scale / 0.05
        param.add_((noise * std).to(device=param.device, dtype=param.dtype))
    return module


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_f64(a), _as_f64(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return a, b


def max_abs_diff(a, b) -> float:
    """max |a - b| over all elements (numpy arrays, tensors or nested lists)."""
    a, b = _pair(a, b)
    return float(np.abs(a - b).max()) if a.size else 0.0


def cosine(a, b) -> float:
    """Cosine similarity of the flattened inputs, in float64 (1.0 when both are all zeros)."""
    a, b = _pair(a, b)
    a, b = a.ravel(), b.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / mse)``; ``inf`` for identical inputs."""
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def assert_parity(got, want, max_diff: float = 2e-3, min_psnr: float = 45.0) -> tuple[float, float]:
    """The acceptance bound of every parity test: same shape, finite, max |diff| <= 2e-3, PSNR >= 45 dB."""
    got_np, want_np = _pair(got, want)
    assert got_np.shape == want_np.shape, (got_np.shape, want_np.shape)
    assert np.isfinite(got_np).all() and np.isfinite(want_np).all(), "non-finite values"
    diff, quality = max_abs_diff(got_np, want_np), psnr(got_np, want_np)
    print(f"parity: shape={got_np.shape} max|diff|={diff:.2e} psnr={quality:.1f} dB")  # shown with pytest -rP
    assert diff <= max_diff and quality >= min_psnr, f"max|diff|={diff:.2e} psnr={quality:.1f}"
    return diff, quality
