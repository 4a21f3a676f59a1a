"""One loaded pipeline, many threads: results equal solo runs bit for bit; engine choices stay per pipeline."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_concurrent_equals_solo, generate_concurrently

REQUESTS = [  # different prompts, seeds, sizes, step counts, CFG on and off
    dict(prompt="a red circle", seed=1, height=32, width=32, num_inference_steps=3, output_type="np"),
    dict(prompt=["a blue square", "a green dot"], seed=2, height=32, width=48, num_inference_steps=2, output_type="np"),
    dict(prompt="a yellow cat", seed=3, height=48, width=32, num_inference_steps=4, guidance_scale=1.0,
         output_type="np"),
    dict(prompt="a cat", seed=4, height=16, width=16, num_inference_steps=1, output_type="latent"),
]


def test_concurrent_generate_equals_solo(toy_gen):
    assert_concurrent_equals_solo(toy_gen, REQUESTS, rounds=2)


def test_concurrent_generate_with_a_step_cache_equals_solo(toy_folder, toy_manager):
    gen = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                        cache="toy-cache")
    solo = assert_concurrent_equals_solo(gen, REQUESTS, rounds=2)
    steps = [r["num_inference_steps"] * (2 if r.get("guidance_scale", 3.0) > 1 else 1) for r in REQUESTS]
    assert [r.cache_stats["computed"] + r.cache_stats["skipped"] for r in solo] == steps  # counters per request
    assert solo[0].cache_stats["skipped"] > 0


def test_two_generators_with_different_backends_do_not_interfere(toy_folder, toy_manager, toy_gen):
    from toy_plugin import model

    counting = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                             attention_backend="toy-counting")
    math = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                         attention_backend="math")
    request = dict(prompt="a cat", seed=0, num_inference_steps=2, output_type="np")
    before = model.ATTENTION_CALLS[0]
    solo = counting.generate(**request).output
    per_run = model.ATTENTION_CALLS[0] - before  # 2 steps x 2 branches x (self + cross) + the VAE's mid-block
    assert per_run == 2 * 2 * 2 + 1
    barrier = threading.Barrier(4)
    results = {}

    def run(name, gen):
        barrier.wait()
        results[name] = gen.generate(**request).output

    before = model.ATTENTION_CALLS[0]
    threads = [threading.Thread(target=run, args=(f"{n}{i}", g))
               for i in range(2) for n, g in (("counting", counting), ("math", math))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.ATTENTION_CALLS[0] - before == 2 * per_run  # only the counting generator's calls were counted
    assert np.array_equal(results["counting0"], solo) and np.array_equal(results["counting1"], solo)
    assert np.allclose(results["math0"], solo, atol=1e-5)  # math attention: same numbers up to rounding
    from diffcore.models import attention

    assert attention.get_backend() == "sdpa"  # nothing leaked into the caller's context


def test_unknown_attention_backend_fails_before_loading(toy_folder, toy_manager):
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                      attention_backend="nope")


def test_stages_hold_no_request_state(toy_gen):
    before = {s.name: dict(vars(s)) for s in toy_gen.pipeline.stages}
    generate_concurrently(toy_gen, REQUESTS[:3])
    after = {s.name: dict(vars(s)) for s in toy_gen.pipeline.stages}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        for key, value in before[name].items():
            assert after[name][key] is value, f"stage {name!r} attribute {key!r} changed while serving requests"


def test_skip_init_is_per_thread():
    """Building on the meta device in one thread must not stop another thread's real initialisation."""
    from diffcore.loader.safetensors_io import skip_init

    kaiming = torch.nn.init.kaiming_uniform_
    inside, done = threading.Event(), threading.Event()

    def build():
        with skip_init():
            with torch.device("meta"):
                torch.nn.Linear(4, 4)
            inside.set()
            done.wait(timeout=30)

    builder = threading.Thread(target=build)
    builder.start()
    assert inside.wait(timeout=30)
    try:
        assert torch.nn.init.kaiming_uniform_ is kaiming  # nothing patched process-wide
        t = torch.zeros(3)
        torch.nn.init.ones_(t)
        assert torch.equal(t, torch.ones(3))
        layer = torch.nn.Linear(4, 4)
        assert layer.weight.abs().sum() > 0
    finally:
        done.set()
        builder.join()


def test_output_type_pt_returns_torch_tensors(toy_gen):
    pt = toy_gen.generate(prompt="a cat", seed=5, output_type="pt")
    np_out = toy_gen.generate(prompt="a cat", seed=5, output_type="np").output
    assert isinstance(pt.output, torch.Tensor) and pt.output.dtype == torch.float32
    assert np.array_equal(pt.output.numpy(), np_out)
    assert pt.images[0].size == (32, 32)
