"""Previews (generate(on_preview=...)): the loop hands out each step's predicted clean latents, the chosen steps
are decoded; the result is unchanged, a batched request previews as it does alone, bad input is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore import previews
from diffcore.errors import SamplingParamError

TOY = dict(prompt="a toy", height=32, width=32, num_inference_steps=6, seed=3)


def test_preview_steps_spread_evenly_and_never_take_the_last_step():
    assert previews.preview_steps(20, 3) == [4, 9, 14]  # after 5, 10 and 15 of 20 steps
    assert previews.preview_steps(20, 1) == [9]
    assert previews.preview_steps(4, 3) == [0, 1, 2]
    assert previews.preview_steps(2, 3) == [0]  # fewer when there are not enough steps
    assert previews.preview_steps(1, 3) == [] and previews.preview_steps(20, 0) == []


def test_a_preview_is_the_decoded_predicted_clean_latents_and_the_result_is_unchanged(toy_gen):
    """x0 recomputed independently from consecutive latents and the schedule's sigmas (Euler: x_{i+1} = x_i +
    (s_{i+1} - s_i) v, x0 = x_i - s_i v), decoded at full size (32 px: no pooling), equals the preview."""
    got, seen = [], []
    req = toy_gen.attach_previews(toy_gen.request(dict(TOY)), got.append, 2)
    req.callback = lambda step, t, latents: seen.append(latents.clone())
    with_previews = toy_gen.run_requests([req])[0]
    plain = toy_gen.generate(**TOY)
    assert np.array_equal(with_previews.output, plain.output)
    assert [(p.index, p.step, p.num_steps) for p in got] == [(0, 2, 6), (1, 4, 6)]
    sigmas = req.scheduler.sigmas
    for p in got:
        i = p.step - 1  # the preview after step i: x_i is what step i started from
        x_i, x_next = seen[i - 1].float(), seen[i].float()
        x0 = x_i - sigmas[i] / (sigmas[i + 1] - sigmas[i]) * (x_next - x_i)
        expected = toy_gen.config.decode(toy_gen.components, x0.to(x_i.dtype), req).float().numpy()
        assert p.output.shape == (1, 32, 32, 3)
        np.testing.assert_allclose(p.output, expected, atol=2e-3)
        assert p.images[0].size == (32, 32)


def test_previews_converge_to_the_picture():
    """On the demo model (trained weights), each preview is closer to the final picture than the one before."""
    from diffcore import DiffGenerator

    gen = DiffGenerator.from_pretrained("demo", progress=False)
    got = []
    final = gen.generate(prompt="a red circle on a blue background", seed=1, on_preview=got.append).output
    errors = [float(((p.output - final) ** 2).mean()) for p in got]
    assert [p.step for p in got] == [5, 10, 15] and errors == sorted(errors, reverse=True) and errors[-1] < 1e-3


def test_pooled_previews_decode_a_smaller_latent_grid(toy_gen, monkeypatch):
    """Past PREVIEW_SIDE the latent grid is pooled by a power of two, decoded smaller, scaled back up."""
    monkeypatch.setattr(previews, "PREVIEW_SIDE", 16)
    assert previews.pooling_factor(toy_gen.config, 32, 32) == 2
    assert previews.pooling_factor(toy_gen.config, 32, 36) == 1  # 36 / 2 is not a multiple of 4 (VAE 2 x patch 2)
    sizes, decode = [], type(toy_gen.config).decode

    def spy(self, components, latents, req):
        sizes.append((req.height, req.width))
        return decode(self, components, latents, req)

    monkeypatch.setattr(type(toy_gen.config), "decode", spy)
    got = []
    toy_gen.generate(**TOY, on_preview=got.append, partial_images=1)
    assert sizes == [(16, 16), (32, 32)]  # the preview at half size, then the final picture
    assert got[0].output.shape == (1, 32, 32, 3) and np.isfinite(got[0].output).all()


def test_a_batched_request_previews_as_it_does_alone(toy_gen):
    solo = []
    toy_gen.generate(**TOY, on_preview=solo.append, partial_images=2)
    batched = []
    with toy_gen.make_runner(max_batch_size=2, max_wait_ms=2000) as runner:
        with_previews = toy_gen.attach_previews(toy_gen.request(dict(TOY)), batched.append, 2)
        futures = [runner.submit(toy_gen.request({**TOY, "prompt": "another", "seed": 9})), runner.submit(with_previews)]
        results = [f.result(timeout=120) for f in futures]
    np.testing.assert_allclose(results[1].output, toy_gen.generate(**TOY).output, atol=1e-4)
    assert [p.step for p in batched] == [p.step for p in solo] == [2, 4]
    for a, b in zip(batched, solo):
        np.testing.assert_allclose(a.output, b.output, atol=1e-4)


@pytest.mark.parametrize("kwargs, param", [
    (dict(on_preview=print, partial_images=-1), "partial_images"),
    (dict(on_preview=print, partial_images=1.5), "partial_images"),
    (dict(on_preview=print, partial_images=True), "partial_images"),
    (dict(partial_images=2), "partial_images"),  # nothing would receive them
    (dict(on_preview="not a function"), "on_preview"),
])
def test_bad_preview_arguments_name_the_parameter(toy_gen, kwargs, param):
    with pytest.raises(SamplingParamError) as info:
        toy_gen.generate(**TOY, **kwargs)
    assert info.value.param == param


def test_a_model_that_cannot_preview_says_so(toy_gen, monkeypatch):
    monkeypatch.setattr(type(toy_gen.config), "previews", False)
    assert not toy_gen.can_preview
    with pytest.raises(SamplingParamError, match="cannot show previews") as info:
        toy_gen.generate(**TOY, on_preview=print)
    assert info.value.param == "on_preview"


def test_schedulers_predict_the_x0_their_step_uses():
    """UniPC's step works on its own x0 prediction: predicted_x0 before the step equals it; inpainting keeps the
    input picture's latents outside the mask."""
    from diffcore.schedulers.unipc import UniPCMultistepScheduler
    from diffcore.stages.image_to_image import MaskedSteps

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    sched.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    sample, out = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    x0 = sched.predicted_x0(out, sched.timesteps[0], sample)
    sched.step(out, sched.timesteps[0], sample)
    assert torch.equal(sched.model_outputs[-1], x0)
    init, mask = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    mask[..., :4] = 1
    masked = MaskedSteps(sched, sched.timesteps, init, torch.randn(1, 4, 8, 8, generator=gen), mask)
    blended = masked.predicted_x0(out, sched.timesteps[1], sample)
    assert torch.equal(blended[..., 4:], init[..., 4:]) and not torch.equal(blended[..., :4], init[..., :4])


def test_a_request_joining_a_running_step_batch_previews_as_it_does_alone(toy_gen):
    """Step-level joining (diffcore.engine.stepping): the joiner's previews come at its own steps, equal to its
    solo previews; the running request's previews are unchanged by the company."""
    from diffcore.engine.batching import BatchScheduler
    from diffcore.testing.joining import Gate, count_rows

    first, late = dict(TOY, num_inference_steps=8, seed=5), dict(TOY, prompt="late", seed=9, num_inference_steps=4)
    solo = {}
    for name, kw in (("first", first), ("late", late)):
        solo[name] = []
        toy_gen.generate(**kw, on_preview=solo[name].append, partial_images=2)
    got = {"first": [], "late": []}
    gate = Gate(at=2)
    rows, remove = count_rows(toy_gen)
    try:
        with BatchScheduler(toy_gen, max_batch_size=2, max_wait_ms=0) as scheduler:
            running = toy_gen.attach_previews(toy_gen.request(dict(first, callback=gate)), got["first"].append, 2)
            futures = [scheduler.submit(running)]
            assert gate.reached.wait(timeout=60)
            futures.append(scheduler.submit(toy_gen.attach_previews(toy_gen.request(late), got["late"].append, 2)))
            gate.release.set()
            [f.result(timeout=120) for f in futures]
    finally:
        remove()
    assert rows[:6] == [1] * 6 and 2 in rows  # three steps alone, then the joiner's rows beside the first's
    for name in ("first", "late"):
        assert [p.step for p in got[name]] == [p.step for p in solo[name]] and len(got[name]) == 2
        for a, b in zip(got[name], solo[name]):
            np.testing.assert_allclose(a.output, b.output, atol=1e-4)


def test_a_scheduler_without_predicted_x0_serves_no_previews(toy_gen, monkeypatch):
    """A plugin's scheduler that only steps (plugin-hooks.md's LinearFlowScheduler): the request runs as it would
    without previews, none are sent."""
    from diffcore.schedulers.base import SchedulerBase

    class Stepper(SchedulerBase):
        diffusers_class_name = "Stepper"

        def __init__(self, num_train_timesteps: int = 1000):
            self._store_config(locals())

        def set_timesteps(self, num_inference_steps, device=None, sigmas=None, mu=None):
            self.sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)
            self.timesteps = self.sigmas[:-1] * 1000
            self._index = 0

        def step(self, model_output, timestep, sample):
            self._index += 1
            return sample + (self.sigmas[self._index] - self.sigmas[self._index - 1]) * model_output

    monkeypatch.setattr(toy_gen.pipeline.stage("timestep_preparation"), "scheduler", Stepper())
    got = []
    result = toy_gen.generate(**TOY, on_preview=got.append, partial_images=2, output_type="np")
    assert got == [] and np.array_equal(result.output, toy_gen.generate(**TOY, output_type="np").output)
