"""Step batches (diffcore.engine.stepping) on the toy model: a request joins a running batch at a step boundary
with its own schedule, a cancelled or finished request leaves it at one; every result equals its solo run.
Counted in denoiser calls and rows, not seconds."""
from __future__ import annotations

import pytest

from diffcore.engine.batching import BatchScheduler
from diffcore.engine.stepping import StepBatch, step_key, step_stage
from diffcore.errors import RequestCancelledError, SamplingParamError
from diffcore.testing.concurrency import assert_close
from diffcore.testing.joining import Gate, assert_join_equals_solo, count_rows

LONG = dict(prompt="a long one", seed=5, num_inference_steps=8, guidance_scale=4.0, output_type="np")


def test_a_request_that_arrives_mid_run_joins_at_its_own_step_and_both_equal_solo(toy_gen):
    joiners = [dict(prompt="a late one", seed=9, num_inference_steps=3, guidance_scale=6.0, output_type="np"),
               dict(prompt=["two", "rows"], seed=3, num_inference_steps=5, guidance_scale=2.0, output_type="np")]
    counted = assert_join_equals_solo(toy_gen, LONG, joiners, at=2)
    assert counted["solo_calls"] == [16, 6, 10]  # CFG: two calls a step
    # steps 0-2 alone (1 row), then 3 steps of 4 rows, then 2 of 3 rows (the 3-step one left; the 5-step
    # one ends with the first one's last step)
    assert counted["rows"] == [1] * 6 + [4] * 6 + [3] * 4
    assert counted["calls"] == 16 < sum(counted["solo_calls"])


def test_a_cancelled_row_is_not_computed_after_it_leaves(toy_gen):
    keep = dict(prompt="the one that stays", seed=11, num_inference_steps=6, guidance_scale=3.0, output_type="np")
    leave = dict(LONG, prompt="the one that leaves", num_inference_steps=6)
    solo = toy_gen.generate(**keep)
    rows, remove = count_rows(toy_gen)
    try:
        with BatchScheduler(toy_gen, max_batch_size=2, max_wait_ms=5000) as scheduler:
            gate = Gate(at=1)
            gone = scheduler.submit(toy_gen.request(dict(leave, callback=gate)))
            kept = scheduler.submit(toy_gen.request(keep))
            assert gate.reached.wait(timeout=60)
            scheduler.cancel(gone)
            gate.release.set()
            result = kept.result(timeout=60)
            with pytest.raises(RequestCancelledError, match="after 3 denoising step"):
                gone.result(timeout=0)
    finally:
        remove()
    # 3 steps of both rows (it ends at the step after it was cancelled), then the kept one's 3 alone
    assert rows == [2] * 6 + [1] * 6
    assert_close("kept", result, solo)


def test_a_cancelled_request_frees_its_place_for_a_waiting_one(toy_gen):
    nxt = dict(prompt="next", seed=2, num_inference_steps=3, guidance_scale=4.0, output_type="np")
    solo = toy_gen.generate(**nxt)
    rows, remove = count_rows(toy_gen)
    try:
        with BatchScheduler(toy_gen, max_batch_size=1, max_wait_ms=0) as scheduler:
            gate = Gate(at=0)
            running = scheduler.submit(toy_gen.request(dict(LONG, num_inference_steps=50, callback=gate)))
            assert gate.reached.wait(timeout=60)
            waiting = scheduler.submit(toy_gen.request(nxt))
            scheduler.cancel(running)
            gate.release.set()
            result = waiting.result(timeout=60)
            with pytest.raises(RequestCancelledError, match="after 2 denoising step"):
                running.result(timeout=0)
    finally:
        remove()
    assert rows == [1] * (2 * 2 + 3 * 2)  # 2 steps of the cancelled one, then the waiting one's 3
    assert_close("next", result, solo)


def test_requests_of_other_sizes_or_cfg_run_as_their_own_step_batch_interleaved(toy_gen):
    other_size = dict(prompt="taller", seed=1, height=48, num_inference_steps=2, guidance_scale=4.0, output_type="np")
    no_cfg = dict(prompt="plain", seed=1, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    later = dict(prompt="same size, later", seed=4, num_inference_steps=2, guidance_scale=3.0, output_type="np")
    reqs = [toy_gen.request(k) for k in (LONG, other_size, no_cfg, later)]
    keys = [step_key(toy_gen.pipeline, r) for r in reqs]
    assert keys[0] == keys[3] and keys[0] != keys[1] and keys[0] != keys[2]
    rows, remove = count_rows(toy_gen)
    try:
        with BatchScheduler(toy_gen, max_batch_size=8, max_wait_ms=0) as scheduler:
            gate = Gate(at=0)
            first = scheduler.submit(toy_gen.request(dict(LONG, callback=gate)))
            assert gate.reached.wait(timeout=60)
            futures = [scheduler.submit(r) for r in reqs[1:]]
            gate.release.set()
            results = [f.result(timeout=60) for f in [first, *futures]]
    finally:
        remove()
    # step 0 alone; then in turn: the 32-px batch (LONG + later: 2 rows, CFG), the 48-px one (CFG), the
    # guidance-free one (1 call) for two rounds; then LONG alone
    assert rows == [1, 1] + [2, 2, 1, 1, 1] * 2 + [1, 1] * 5
    for kwargs, got in zip((LONG, other_size, no_cfg, later), results):
        assert_close(kwargs["prompt"], got, toy_gen.generate(**kwargs))


def test_submit_takes_only_validated_requests_and_step_batching_can_be_off(toy_gen):
    with BatchScheduler(toy_gen, max_batch_size=4, max_wait_ms=0, step_batching=False) as scheduler:
        with pytest.raises(SamplingParamError, match="validated Request"):
            scheduler.submit(dict(prompt="a cat"))
        rows, remove = count_rows(toy_gen)
        try:
            gate = Gate(at=0)
            first = scheduler.submit(toy_gen.request(dict(LONG, num_inference_steps=2, callback=gate)))
            assert gate.reached.wait(timeout=60)
            second = scheduler.submit(toy_gen.request(dict(LONG, seed=7, num_inference_steps=2)))
            gate.release.set()
            first.result(timeout=60), second.result(timeout=60)
        finally:
            remove()
    assert rows == [1] * 8  # off: the second waits for the first batch to end


def test_pipelines_that_cannot_step_rows_say_so(toy_gen):
    assert step_stage(toy_gen.pipeline) is not None
    config = type(toy_gen.pipeline.config)
    try:
        config.step_rows = False
        assert step_stage(toy_gen.pipeline) is None
        assert step_key(toy_gen.pipeline, toy_gen.request(dict(LONG))) is None
        with pytest.raises(ValueError, match="cannot be stepped"):
            StepBatch(toy_gen.pipeline)
    finally:
        del config.step_rows


def test_shutdown_with_cancel_stops_running_work_at_the_next_step_and_drops_the_queue(toy_gen):
    rows, remove = count_rows(toy_gen)
    try:
        scheduler = BatchScheduler(toy_gen, max_batch_size=1, max_wait_ms=0)
        gate = Gate(at=0)
        running = scheduler.submit(toy_gen.request(dict(LONG, num_inference_steps=50, callback=gate)))
        assert gate.reached.wait(timeout=60)
        waiting = scheduler.submit(toy_gen.request(dict(LONG, seed=2)))
        scheduler.shutdown(wait=False, cancel=True)
        gate.release.set()
        scheduler.shutdown(wait=True)
        with pytest.raises(RequestCancelledError, match="after 2 denoising step"):
            running.result(timeout=0)
        assert waiting.cancelled()
    finally:
        remove()
    assert rows == [1] * 4  # two steps of the running one (CFG: two calls each), nothing of the waiting one
