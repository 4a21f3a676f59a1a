"""Check that concurrent generate() calls on one DiffGenerator give exactly their solo results.

Shared by the core and the plugins' tests: every family must pass it, with and without a step cache.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

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
