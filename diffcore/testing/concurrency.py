"""Check that concurrent generate() calls on one DiffGenerator give exactly their solo results.

Shared by the core and the plugins' tests: every family must pass it, with and without a step cache.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np


def _arrays(result) -> tuple:
    out = None if result.output is None else np.asarray(result.output)
    return out, result.latents.float().numpy()


def generate_concurrently(gen, requests: list[dict]) -> list:
    """Run every request of ``requests`` (generate() keywords) in its own thread, all released at once."""
    barrier = threading.Barrier(len(requests))

    def run(kwargs):
        barrier.wait()
        return gen.generate(**kwargs)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(run, requests))


def assert_concurrent_equals_solo(gen, requests: list[dict], rounds: int = 1) -> list:
    """Each request's output and final latents from concurrent threads must equal its solo run bit for bit.

    ``rounds`` > 1 repeats the concurrent run (interleavings differ between rounds). Returns the solo results.
    """
    assert len(requests) >= 3, "use at least 3 concurrent requests"
    solo = [gen.generate(**kwargs) for kwargs in requests]
    for _ in range(rounds):
        together = generate_concurrently(gen, requests)
        for i, (a, b) in enumerate(zip(solo, together)):
            (out_a, lat_a), (out_b, lat_b) = _arrays(a), _arrays(b)
            assert np.array_equal(lat_a, lat_b), (
                f"request {i} ({requests[i]}): concurrent latents differ from solo by {np.abs(lat_a - lat_b).max():.3g}")
            assert (out_a is None) == (out_b is None) and (out_a is None or np.array_equal(out_a, out_b)), (
                f"request {i} ({requests[i]}): concurrent output differs from solo")
            assert a.cache_stats == b.cache_stats, f"request {i}: step-cache counters {b.cache_stats} != {a.cache_stats}"
    return solo


def psnr_db(got: np.ndarray, want: np.ndarray) -> float:
    """PSNR over the reference's value range (inf when equal)."""
    err = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    span = float(want.max() - want.min()) or 1.0
    return float("inf") if err == 0 else 10 * np.log10(span**2 / err)


def count_denoiser_calls(gen):
    """``(calls, remove)``: a list that grows by one per denoiser forward call, and a function removing the hooks."""
    calls: list = []
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in gen.pipeline.stage("denoising").transformers]
    return calls, lambda: [h.remove() for h in handles]


def assert_close(name: str, got, want, max_diff: float = 1e-4, min_psnr: float = 60.0,
                 output_max_diff: Optional[float] = None) -> None:
    """``got`` (a GenerationResult) equals ``want`` (its solo run): latents and output within the bounds
    (``output_max_diff``: another bound for the output, e.g. one 8-bit step for pictures quantised after decoding)."""
    pairs = [("latents", want.latents.float().numpy(), got.latents.float().numpy())]
    if want.output is not None:
        pairs.append(("output", np.asarray(want.output), np.asarray(got.output)))
    for what, a, b in pairs:
        assert b.shape == a.shape, f"{name} {what} shape {b.shape} != solo {a.shape}"
        diff, quality = float(np.abs(b - a).max()), psnr_db(b, a)
        bound = output_max_diff if what == "output" and output_max_diff is not None else max_diff
        assert diff <= bound and quality >= min_psnr, (
            f"{name} {what} differs from solo: max |diff| {diff:.3g}, PSNR {quality:.1f} dB")


def assert_batch_equals_solo(gen, requests: list[dict], max_diff: float = 1e-4, min_psnr: float = 60.0,
                             output_max_diff: Optional[float] = None) -> dict:
    """generate_batch(requests) must give every request its solo generate() result (outputs and latents
    within ``max_diff`` and ``min_psnr``; ``output_max_diff``: another bound for the outputs, e.g. one 8-bit
    step for pictures quantised after decoding). Returns the denoiser call counts ``{"solo": [...], "batch": n}``."""
    calls, remove = count_denoiser_calls(gen)
    try:
        solo, solo_calls = [], []
        for kwargs in requests:
            before = len(calls)
            solo.append(gen.generate(**kwargs))
            solo_calls.append(len(calls) - before)
        before = len(calls)
        batch = gen.generate_batch(requests)
        batch_calls = len(calls) - before
    finally:
        remove()
    assert len(batch) == len(requests)
    for i, (a, b) in enumerate(zip(solo, batch)):
        assert_close(f"request {i} ({requests[i]}): batched", b, a, max_diff, min_psnr, output_max_diff)
    return {"solo": solo_calls, "batch": batch_calls}


def mark_cancels(runner, calls: list) -> list:
    """A list that gets ``len(calls)`` each time ``runner.cancel`` is called (the transformer calls made up to
    the cancellation, to count how many more the cancelled request made)."""
    marks, cancel = [], runner.cancel

    def marked(future):
        marks.append(len(calls))
        return cancel(future)

    runner.cancel = marked
    return marks
