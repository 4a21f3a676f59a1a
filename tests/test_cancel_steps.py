"""Step-level cancellation in the BatchScheduler (toy model): a cancelled running request stops at the next
denoising step, the other rows of its batch keep their solo result, the next request is not delayed.
Counted in transformer calls, not seconds."""
from __future__ import annotations

import numpy as np
import pytest

from diffcore.engine.batching import BatchScheduler
from diffcore.errors import RequestCancelledError
from diffcore.testing.concurrency import count_denoiser_calls
from diffcore.testing.joining import Gate

STEPS = 12
LONG = dict(prompt="a long one", seed=5, num_inference_steps=STEPS, guidance_scale=4.0, output_type="np")


@pytest.fixture
def calls(toy_gen):
    counted, remove = count_denoiser_calls(toy_gen)
    yield counted
    remove()


def _solo_calls(toy_gen, calls, kwargs):
    before = len(calls)
    result = toy_gen.generate(**kwargs)
    return len(calls) - before, result


def test_cancelled_request_stops_at_the_next_step_and_frees_the_engine(toy_gen, calls):
    per_run, _ = _solo_calls(toy_gen, calls, LONG)
    per_step = per_run // STEPS
    assert per_step == 2  # CFG: two calls a step
    nxt = dict(prompt="the next one", seed=8, num_inference_steps=4, guidance_scale=4.0, output_type="np")
    next_calls, next_solo = _solo_calls(toy_gen, calls, nxt)
    with BatchScheduler(toy_gen, max_batch_size=1, max_wait_ms=0) as scheduler:
        gate = Gate(at=2)
        running = scheduler.submit(toy_gen.request(dict(LONG, callback=gate)))
        assert gate.reached.wait(timeout=60)  # 3 steps done, the worker is held after the third
        queued = scheduler.submit(toy_gen.request(nxt))
        start = len(calls)
        assert not scheduler.cancel(running)  # it runs: asked to stop, not dropped
        gate.release.set()
        with pytest.raises(RequestCancelledError, match="after 4 denoising step"):
            running.result(timeout=60)
        result = queued.result(timeout=60)
    # the step in flight when it was cancelled finished (one step), then only the next request's own calls
    assert len(calls) - start == per_step + next_calls
    assert np.abs(result.output - next_solo.output).max() <= 1e-4


def test_a_cancelled_row_ends_at_a_step_and_its_batch_neighbour_keeps_its_solo_result(toy_gen, calls):
    keep = dict(prompt="the one that stays", seed=11, num_inference_steps=6, guidance_scale=3.0, output_type="np")
    leave = dict(prompt="the one that leaves", seed=12, num_inference_steps=6, guidance_scale=6.0, output_type="np")
    solo_calls, solo = _solo_calls(toy_gen, calls, keep)
    seen = []  # at each of the kept request's steps: whether the cancelled one's future had ended
    with BatchScheduler(toy_gen, max_batch_size=2, max_wait_ms=5000) as scheduler:
        gate = Gate(at=1)
        futures = {}
        futures["leave"] = scheduler.submit(toy_gen.request(dict(leave, callback=gate)))
        futures["keep"] = scheduler.submit(toy_gen.request(
            dict(keep, callback=lambda s, t, x: seen.append(futures["leave"].done()))))
        assert gate.reached.wait(timeout=60)
        start = len(calls)
        scheduler.cancel(futures["leave"])
        gate.release.set()
        result = futures["keep"].result(timeout=60)
        with pytest.raises(RequestCancelledError, match="after 3 denoising step"):
            futures["leave"].result(timeout=0)
    assert seen == [False, False, True, True, True, True]  # it ended at the step after it was cancelled
    assert len(calls) - start == solo_calls - 2 * 2  # the batch ran its 4 steps left (the cancelled row rides along)
    assert np.abs(result.output - solo.output).max() <= 1e-4


def test_a_batch_whose_every_request_is_cancelled_stops_at_the_next_step(toy_gen, calls):
    a = dict(prompt="first", seed=1, num_inference_steps=STEPS, guidance_scale=3.0, output_type="np")
    b = dict(prompt="second", seed=2, num_inference_steps=STEPS, guidance_scale=3.0, output_type="np")
    with BatchScheduler(toy_gen, max_batch_size=2, max_wait_ms=5000) as scheduler:
        gate = Gate(at=0)
        fa, fb = scheduler.submit(toy_gen.request(dict(a, callback=gate))), scheduler.submit(toy_gen.request(b))
        assert gate.reached.wait(timeout=60)
        start = len(calls)
        scheduler.cancel(fa)
        scheduler.cancel(fb)
        gate.release.set()
        # b's check at step 0 comes after a's held callback, when both are cancelled; a's at step 1
        for f, steps in ((fa, 2), (fb, 1)):
            with pytest.raises(RequestCancelledError, match=f"after {steps} denoising step"):
                f.result(timeout=60)
        after = scheduler.submit(toy_gen.request(dict(a, num_inference_steps=2)))
        assert after.result(timeout=60).output is not None  # the engine serves on
    assert len(calls) - start == 2 + 2 * 2  # one more shared step (CFG: 2 calls), then the 2-step request


def test_cancelling_a_finished_request_changes_nothing(toy_gen):
    with BatchScheduler(toy_gen, max_batch_size=1, max_wait_ms=0) as scheduler:
        done = scheduler.submit(toy_gen.request(dict(prompt="quick", seed=3, num_inference_steps=2, output_type="np")))
        out = done.result(timeout=60).output
        assert not scheduler.cancel(done)
        assert done.result().output is out
