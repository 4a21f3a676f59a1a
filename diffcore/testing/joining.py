"""Check that requests joining a running step batch (diffcore.engine.stepping) get exactly their solo results.

Shared by the core and the plugins' tests: every family whose requests step row by row must pass it.
"""
from __future__ import annotations

import threading

from ..engine.batching import BatchScheduler
from .concurrency import assert_close


def count_rows(gen):
    """``(rows, remove)``: a list that gets each denoiser call's number of rows (its ``hidden_states``' batch
    size), and a function removing the hooks."""
    rows: list = []

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        rows.append(int(x.shape[0]))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in gen.pipeline.stage("denoising").transformers]
    return rows, lambda: [h.remove() for h in handles]


class Gate:
    """A step callback that holds the engine's worker after step ``at`` (from 0) until released."""

    def __init__(self, at: int):
        self.at, self.reached, self.release = at, threading.Event(), threading.Event()

    def __call__(self, step, t, latents):
        if step == self.at:
            self.reached.set()
            assert self.release.wait(timeout=120), "the test never released the gate"


def assert_join_equals_solo(gen, first: dict, joiners: list[dict], at: int = 1, max_diff: float = 1e-4,
                            min_psnr: float = 60.0) -> dict:
    """Run ``first`` (generate() keywords) on a BatchScheduler; after its step ``at`` submit ``joiners``, which
    join it at the next step boundary, each at its own step 0 (their step counts, guidance and seeds may
    differ). Every result must equal its solo generate(). Returns the denoiser calls and rows:
    ``{"solo_calls": [...], "calls": n, "rows": [rows of each call]}``."""
    rows, remove = count_rows(gen)
    try:
        solo, solo_calls = [], []
        for kwargs in [first, *joiners]:
            before = len(rows)
            solo.append(gen.generate(**kwargs))
            solo_calls.append(len(rows) - before)
        before = len(rows)
        gate = Gate(at)
        with BatchScheduler(gen, max_batch_size=1 + len(joiners), max_wait_ms=0) as scheduler:
            futures = [scheduler.submit(gen.request(dict(first, callback=gate)))]
            assert gate.reached.wait(timeout=120)
            futures += [scheduler.submit(gen.request(kwargs)) for kwargs in joiners]
            gate.release.set()
            together = [f.result(timeout=300) for f in futures]
        made = rows[before:]
    finally:
        remove()
    for i, (kwargs, a, b) in enumerate(zip([first, *joiners], solo, together)):
        assert_close(f"request {i} ({ {k: v for k, v in kwargs.items() if k != 'image'} })", b, a, max_diff, min_psnr)
    return {"solo_calls": solo_calls, "calls": len(made), "rows": made}
