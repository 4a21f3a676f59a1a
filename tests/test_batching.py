"""generate_batch and the BatchScheduler on the toy model: grouping, per-request results and errors, the queue."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import diffcore
from diffcore import DiffGenerator
from diffcore.engine.batching import BatchScheduler, batch_plan
from diffcore.errors import EngineShutdownError, QueueFullError, SamplingParamError
from diffcore.testing.concurrency import assert_batch_equals_solo

MIXED = [dict(prompt="a red circle", seed=1, guidance_scale=3.0, output_type="np"),
         dict(prompt=["a blue square", "a dog"], seed=2, guidance_scale=5.0, output_type="np"),
         dict(prompt="a cat", seed=3, guidance_scale=1.0, output_type="np"),  # no CFG: its own group
         dict(prompt="a cat", seed=3, height=48, output_type="np"),  # another size: its own group
         dict(prompt="a bird", seed=9, guidance_scale=7.0, output_type="latent")]


def test_generate_batch_groups_compatible_requests(toy_gen):
    calls = assert_batch_equals_solo(toy_gen, MIXED)
    assert calls["solo"] == [4, 4, 2, 4, 4]
    assert calls["batch"] == 4 + 2 + 4 + 4  # the two 32x32 CFG requests shared every transformer call


def test_generate_batch_validates_every_request_first(toy_gen):
    with pytest.raises(SamplingParamError, match="num_inference_steps"):
        toy_gen.generate_batch([MIXED[0], dict(prompt="x", num_inference_steps=0)])


def test_pipelines_with_unknown_stages_run_requests_alone(toy_gen):
    assert batch_plan(toy_gen.pipeline) == 1  # input validation per request, then text encoding over rows
    stage = toy_gen.pipeline.stage("conditioning")
    try:
        stage.batch = None  # a stage that does not say how it batches
        assert batch_plan(toy_gen.pipeline) is None
        assert_batch_equals_solo(toy_gen, MIXED[:2])
    finally:
        del stage.batch


def test_scheduler_serves_many_threads(toy_gen):
    sizes = []
    scheduler = diffcore.BatchScheduler(toy_gen, max_batch_size=4, max_wait_ms=200)
    scheduler.on_batch = sizes.append
    requests = [dict(prompt=f"a cat number {i}", seed=i, guidance_scale=2.0 + i, output_type="np") for i in range(6)]
    futures = [None] * len(requests)
    threads = [threading.Thread(target=lambda i=i: futures.__setitem__(i, scheduler.submit(toy_gen.request(requests[i]))))
               for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [f.result(timeout=120) for f in futures]
    scheduler.shutdown()
    assert sum(sizes) == 6 and max(sizes) <= 4 and len(sizes) < 6  # batched, never above max_batch_size
    for r, kw in zip(results, requests):
        solo = toy_gen.generate(**kw).output
        assert np.abs(r.output - solo).max() <= 1e-4


def _blocked(scheduler, toy_gen):
    """Submit a request whose first step blocks until the returned event is set (the worker is then busy)."""
    started, release = threading.Event(), threading.Event()

    def hold(step, t, latents):
        started.set()
        release.wait(timeout=60)

    future = scheduler.submit(toy_gen.request(dict(prompt="a slow one", callback=hold)))
    assert started.wait(timeout=60)
    return future, release


def test_bad_request_fails_alone_and_progress_is_reported(toy_gen):
    scheduler = BatchScheduler(toy_gen, max_batch_size=8, max_wait_ms=0)
    first, release = _blocked(scheduler, toy_gen)
    steps = []
    good = scheduler.submit(toy_gen.request(dict(prompt="a red circle", num_inference_steps=3)),
                            on_step=lambda s, n: steps.append((s, n)))
    with pytest.raises(SamplingParamError, match="num_inference_steps"):  # refused before it queues
        toy_gen.request(dict(prompt="a cat", num_inference_steps=0))
    with pytest.raises(SamplingParamError, match="no_such_parameter"):
        toy_gen.request(dict(prompt="a cat", no_such_parameter=1))
    with pytest.raises(SamplingParamError, match="validated Request"):  # keywords are not queued as they are
        scheduler.submit(dict(prompt="a cat"))
    also_good = scheduler.submit(toy_gen.request(dict(prompt="a dog", seed=4)))
    more = [scheduler.submit(toy_gen.request(dict(prompt="a cow", seed=s, height=48))) for s in (5, 6)]
    assert scheduler.queue_depth == 5  # 4 waiting + the running one
    release.set()
    assert good.result(timeout=60).output.shape == (1, 32, 32, 3)
    assert also_good.result(timeout=60).output is not None and first.result(timeout=60) is not None
    assert all(f.result(timeout=60).output.shape == (1, 48, 32, 3) for f in more)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    scheduler.shutdown()


def test_queue_limit_cancel_and_shutdown(toy_gen):
    scheduler = BatchScheduler(toy_gen, max_batch_size=2, max_wait_ms=0, max_queue=2)
    running, release = _blocked(scheduler, toy_gen)
    waiting = [scheduler.submit(toy_gen.request(dict(prompt="a cat", seed=i))) for i in range(2)]
    with pytest.raises(QueueFullError, match="queue is full"):
        scheduler.submit(toy_gen.request(dict(prompt="one too many")))
    assert scheduler.cancel(waiting[0]) and waiting[0].cancelled()
    assert not scheduler.cancel(running)  # already started
    assert scheduler.queue_depth == 2  # 1 waiting + the running one
    scheduler.submit(toy_gen.request(dict(prompt="room again", seed=7)))  # the cancelled one freed its place
    release.set()
    scheduler.shutdown(wait=True)  # finishes what was queued
    assert waiting[1].done() and waiting[1].result().output is not None
    with pytest.raises(EngineShutdownError):
        scheduler.submit(toy_gen.request(dict(prompt="too late")))


def test_scheduler_with_a_step_cache_runs_requests_alone(toy_folder, toy_manager):
    gen = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                        cache="toy-cache")
    with BatchScheduler(gen, max_wait_ms=50) as scheduler:
        futures = [scheduler.submit(gen.request(dict(prompt=p, num_inference_steps=4))) for p in ("a cat", "a dog")]
        stats = [f.result(timeout=60).cache_stats for f in futures]
    assert stats == [{"computed": 4, "skipped": 4}] * 2  # each request its own cache, as alone
