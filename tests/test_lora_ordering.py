"""Adapter changes are ordered with generation: unload / fuse / unfuse never tear a running generation
(issue 30 item 7, issue 29 item 4). Threads meet at a denoising step through events, so the test does not
depend on timing: without the ordering, the change lands between two steps and the result is neither."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.errors import LoraError, LoraInUseError, LoraNotFoundError

KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=4, seed=3, output_type="np")


def _lora(model) -> dict:
    g, state = torch.Generator().manual_seed(1), {}
    for name in ("blocks.0.attn1.to_q", "proj_out"):
        layer = model.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g) * 0.5
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g) * 0.5
    return state


@pytest.fixture
def gen(toy_folder, toy_manager):
    g = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager)
    g.load_lora(_lora(g.components["transformer"]), name="style")
    return g


def _generate_paused(gen, change, **kw):
    """Generate in a thread that stops after step 1 until ``change`` (run in this thread) has started; returns
    (the generation's output, what ``change`` returned or raised)."""
    at_step, go, out = threading.Event(), threading.Event(), {}

    def callback(i, t, latents):
        if i == 1:
            at_step.set()
            go.wait(5)  # the change has started by now (or is refused)

    def run():
        try:
            out["image"] = gen.generate(**{**KW, **kw}, callback=callback).output
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["image"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    if not at_step.wait(30):
        worker.join(30)
        pytest.fail(f"the generation did not reach step 1: {out.get('image')!r}")
    done = {}

    def do_change():
        try:
            done["value"] = change()
        except Exception as exc:  # noqa: BLE001
            done["value"] = exc

    changer = threading.Thread(target=do_change)
    changer.start()
    changer.join(0.5)  # an ordered change waits for the generation; an unordered one is done by now
    waited = changer.is_alive()
    go.set()
    worker.join(30)
    changer.join(30)
    return out["image"], done.get("value"), waited


def test_unload_waits_for_the_generation_that_uses_the_adapter(gen):
    styled = gen.generate(**KW, loras={"style": 1.0}).output
    plain = gen.generate(**KW).output
    image, result, waited = _generate_paused(gen, lambda: gen.unload_lora("style"), loras={"style": 1.0})
    assert waited and result is None and "style" not in gen.loras
    np.testing.assert_array_equal(image, styled)  # all steps with the adapter, none without
    np.testing.assert_array_equal(gen.generate(**KW).output, plain)


def test_unload_with_timeout_zero_is_refused_and_changes_nothing(gen):
    styled = gen.generate(**KW, loras={"style": 1.0}).output
    image, result, _ = _generate_paused(gen, lambda: gen.unload_lora("style", timeout=0), loras={"style": 1.0})
    assert isinstance(result, LoraInUseError) and "style" in str(result)
    np.testing.assert_array_equal(image, styled)
    assert "style" in gen.loras
    np.testing.assert_array_equal(gen.generate(**KW, loras={"style": 1.0}).output, styled)


def test_a_request_cannot_pick_an_adapter_being_unloaded(gen):
    unloading: list = []

    def change():
        unloading.append(threading.Thread(target=gen.unload_lora, args=("style",)))
        unloading[0].start()  # waits for the paused generation
        for _ in range(100):  # until the unload has begun: from then on no new request may pick the adapter
            try:
                gen.generate(**{**KW, "num_inference_steps": 1}, loras={"style": 1.0})
            except LoraNotFoundError as exc:
                return str(exc)
        return "never refused"

    image, result, _ = _generate_paused(gen, change, loras={"style": 1.0})
    unloading[0].join(30)
    assert "being unloaded" in result and not isinstance(image, Exception) and "style" not in gen.loras


@pytest.mark.parametrize("op", ["fuse", "unfuse"])
def test_fuse_and_unfuse_wait_for_running_generations(gen, op):
    plain = gen.generate(**KW).output
    if op == "unfuse":
        gen.fuse_lora({"style": 1.0})
        fused = gen.generate(**KW).output
        image, result, waited = _generate_paused(gen, gen.unfuse_lora)
        np.testing.assert_array_equal(image, fused)  # every step fused
        np.testing.assert_array_equal(gen.generate(**KW).output, plain)
    else:
        image, result, waited = _generate_paused(gen, lambda: gen.fuse_lora({"style": 1.0}))
        np.testing.assert_array_equal(image, plain)  # every step unfused
        assert gen.loras["style"].fused == 1.0
        gen.unfuse_lora()
    assert waited and result is None


def test_an_adapter_change_from_inside_a_generation_is_refused_not_a_deadlock(gen):
    seen = []

    def callback(i, t, latents):
        if i == 0:
            with pytest.raises(LoraInUseError, match="inside a generation"):
                gen.unload_lora("style")
            seen.append(i)

    gen.generate(**KW, loras={"style": 1.0}, callback=callback)
    assert seen == [0] and "style" in gen.loras


@pytest.mark.parametrize("bad", [None, 3, ["a"]])
def test_bad_lora_arguments_are_lora_errors(gen, bad):
    with pytest.raises(LoraError):
        gen.load_lora(bad)
    with pytest.raises(LoraError, match="name: weight"):
        gen.fuse_lora("style" if bad is None else bad)
