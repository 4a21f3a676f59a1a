"""Few-step DMD sampling: DmdDenoisingStage against the algorithm written out plainly (bit-exact, fp32),
and the WanDMDPipeline against diffusers' Wan components driven by that loop (PSNR >= 45 dB)."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from diffcore.errors import SamplingParamError
from diffcore.request import Request
from wan_testlib import compare, ours

KW = dict(num_frames=5, height=32, width=48)


def grid(shift: float):
    """The oracle's sigma grid: diffusers' FlowMatchEulerDiscreteScheduler before set_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    return lambda t: float(s.sigmas[torch.argmin((s.timesteps.double() - t).abs())])


def plain_dmd(model_call, x, timesteps, sigma, generator):
    """The DMD loop: x0 = x_t - sigma(t) v (float64), then re-noise to the next timestep with fresh noise."""
    for i, t in enumerate(timesteps):
        v = model_call(x, t)
        x0 = (x.double() - sigma(t) * v.double()).float()
        if i == len(timesteps) - 1:
            return x0
        s = sigma(timesteps[i + 1])
        x = (1 - s) * x0 + s * torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return x


def request_until(gen, stage_name: str, **kwargs) -> Request:
    """Run the pipeline's stages before ``stage_name`` on a fresh request."""
    params = gen.sampling_params_cls.from_user(**kwargs)
    req = Request(params=params, prompts=params.prompts, batch_size=len(params.prompts), device=torch.device("cpu"),
                  generator=torch.Generator("cpu").manual_seed(params.seed))
    for stage in gen.pipeline.stages:
        if stage.name == stage_name:
            return req
        req = stage(req)
    raise AssertionError(stage_name)


def clone_generator(g: torch.Generator) -> torch.Generator:
    return torch.Generator("cpu").set_state(g.get_state())


@pytest.mark.parametrize("timesteps", [None, [999, 640, 300, 50]])
def test_stage_equals_the_plain_loop_bit_exact(fewstep_folders, timesteps):
    gen = ours(fewstep_folders["dmd"])
    req = request_until(gen, "denoising", prompt=["a cat", "a red square"], seed=5, timesteps=timesteps, **KW)
    model, cond = gen.components["transformer"], req.condition["cond"]
    x, g = req.latents.clone(), clone_generator(req.generator)

    def call(x, t):
        return model(hidden_states=x, timestep=torch.tensor(float(t)).expand(x.shape[0]), **cond)

    with torch.inference_mode():
        want = plain_dmd(call, x, timesteps or [1000, 757, 522], grid(8.0), g)
        got = gen.pipeline.stage("denoising")(req).latents
    assert torch.equal(got, want)
    assert torch.equal(req.generator.get_state(), g.get_state())  # the noise stream continued the same way


def load_diffusers(folder, image_to_video: bool = False):
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    with mock.patch.object(WanTransformer3DModel, "_keep_in_fp32_modules", None):
        pipe = (WanImageToVideoPipeline if image_to_video else WanPipeline).from_pretrained(folder)
    if pipe.config.get("expand_timesteps") and not image_to_video:  # TI2V with an image: diffusers' I2V pipeline
        parts = {k: getattr(pipe, k) for k in ("tokenizer", "text_encoder", "vae", "transformer")}
        pipe = WanImageToVideoPipeline(**parts, scheduler=pipe.scheduler, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def diffusers_wan(fewstep_folders):
    return load_diffusers(fewstep_folders["dmd"])


def diffusers_dmd(pipe, prompt, timesteps, shift, seed, num_frames, height, width, image=None):
    """DMD sampling with diffusers' Wan components: encode, draw (+ image condition as diffusers' Wan
    pipelines build it), the plain DMD loop (experts switched at the boundary), decode."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    cfg = pipe.config
    with torch.inference_mode():
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
        g = torch.Generator("cpu").manual_seed(seed)
        model_in, ts_of = (lambda x: x), (lambda t, x: torch.tensor([float(t)]).expand(x.shape[0]))
        if image is None:
            x = pipe.prepare_latents(len(prompts), pipe.transformer.config.in_channels, height, width, num_frames,
                                     torch.float32, torch.device("cpu"), g)
        else:
            pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(torch.float32)
            out = pipe.prepare_latents(pixels, len(prompts), pipe.vae.config.z_dim, height, width, num_frames,
                                       torch.float32, torch.device("cpu"), g)
            if cfg.get("expand_timesteps"):
                x, condition, mask = out
                model_in = lambda x: (1 - mask) * condition + mask * x  # noqa: E731
                ts_of = lambda t, x: (mask[0][0][:, ::2, ::2] * float(t)).flatten()[None].expand(x.shape[0], -1)  # noqa: E731
            else:
                x, condition = out
                model_in = lambda x: torch.cat([x, condition], dim=1)  # noqa: E731
        boundary = (cfg.get("boundary_ratio") or 0) * 1000

        def call(x, t):
            model = pipe.transformer if t >= boundary or pipe.transformer_2 is None else pipe.transformer_2
            return model(hidden_states=model_in(x), timestep=ts_of(t, x), encoder_hidden_states=embeds,
                         return_dict=False)[0]

        x0 = plain_dmd(call, x, timesteps, grid(shift), g)
        if cfg.get("expand_timesteps") and image is not None:  # the clean first frame is the image's
            x0 = model_in(x0)
        vae = pipe.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        video = vae.decode(x0 / inv_std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")


@pytest.mark.parametrize("prompt,seed,request_kwargs,timesteps,shift", [
    ("a red  cat &amp; a dog\n", 1, {}, [1000, 757, 522], 8.0),
    (["a dog", "two yellow squares"], 2, {"timesteps": [988, 932, 852, 608]}, [988, 932, 852, 608], 8.0),
    ("a cat", 3, {"timesteps": [1000, 500], "flow_shift": 3.0}, [1000, 500], 3.0),
])
def test_wan_dmd_pipeline_matches_diffusers_components(fewstep_folders, diffusers_wan, prompt, seed,
                                                       request_kwargs, timesteps, shift):
    got = ours(fewstep_folders["dmd"]).generate(prompt=prompt, seed=seed, output_type="np", **KW,
                                                **request_kwargs).output
    want = diffusers_dmd(diffusers_wan, prompt, timesteps, shift, seed, **KW)
    assert got.shape == (len(want), 5, 32, 48, 3)
    compare(got, want)


@pytest.mark.parametrize("kind,config,size,timesteps", [
    ("ti2v", "FastWan22TI2V5BConfig", (64, 96), [1000, 757, 522]),  # first frame = the image, per-token t
    ("i2v22", "TurboWan22I2VConfig", (48, 32), [996, 932, 852, 608]),  # the last step runs transformer_2
])
def test_image_conditioned_dmd_matches_diffusers_components(fewstep_folders, kind, config, size, timesteps):
    from wan_testlib import random_image

    gen = ours(fewstep_folders[kind])
    assert type(gen.config).__name__ == config
    image, kw = random_image(56, 40, seed=3), dict(num_frames=5, height=size[0], width=size[1])
    calls = []
    hooks = [gen.components[n].register_forward_hook(lambda m, a, out, name=n: calls.append(name))
             for n in ("transformer", "transformer_2") if gen.components.get(n) is not None]
    try:
        got = gen.generate(prompt="a cat walks", image=image, seed=4, output_type="np", **kw).output
    finally:
        for h in hooks:
            h.remove()
    want = diffusers_dmd(load_diffusers(fewstep_folders[kind], image_to_video=kind == "i2v22"), "a cat walks",
                         timesteps, 8.0, 4, image=image, **kw)
    compare(got, want)
    if kind == "i2v22":  # boundary 0.9: 996 and 932 on the high-noise expert, 852 and 608 on the low-noise one
        assert calls == ["transformer", "transformer", "transformer_2", "transformer_2"]


def test_seed_reproduces_and_timesteps_matter(fewstep_folders):
    gen = ours(fewstep_folders["dmd"])
    run = lambda **kw: gen.generate(prompt="a cat", output_type="np", **KW, **kw).output  # noqa: E731
    first = run(seed=11)
    assert np.array_equal(first, run(seed=11))
    assert np.abs(first - run(seed=12)).max() > 1e-3
    assert np.abs(first - run(seed=11, timesteps=[1000, 600])).max() > 1e-3
    assert gen.config.dmd.timesteps == (1000, 757, 522) and gen.config.cfg == "none"
    seen = []
    gen.generate(prompt="a cat", output_type="latent", callback=lambda i, t, x: seen.append((i, float(t))), **KW)
    assert seen == [(0, 1000.0), (1, 757.0), (2, 522.0)]  # the step callback, as DenoisingStage calls it


@pytest.mark.parametrize("kwargs,field", [
    ({"timesteps": [500, 700]}, "timesteps"),  # must decrease
    ({"timesteps": []}, "timesteps"),
    ({"timesteps": [1000, float("nan")]}, "timesteps"),
    ({"timesteps": [1500]}, "timesteps"),
    ({"flow_shift": -1.0}, "flow_shift"),
    ({"guidance_scale": 5.0}, "guidance_scale"),  # distilled: no CFG
    ({"negative_prompt": "blurry"}, "negative_prompt"),
])
def test_bad_few_step_parameters_are_refused(fewstep_folders, kwargs, field):
    with pytest.raises(SamplingParamError) as info:
        ours(fewstep_folders["dmd"]).generate(prompt="a cat", **KW, **kwargs)
    assert info.value.param == field


def test_timesteps_are_refused_by_a_scheduler_model(wan_folders):
    with pytest.raises(SamplingParamError, match="few-step") as info:
        ours(wan_folders["t2v21"]).generate(prompt="a cat", timesteps=[1000, 500], **KW)
    assert info.value.param == "timesteps"


def test_cli_takes_timesteps(fewstep_folders, tmp_path, capsys):
    from diffcore.cli import main

    out = tmp_path / "fast.png"
    args = ["generate", "--model", str(fewstep_folders["dmd"]), "--prompt", "a cat", "--num-frames", "5", "--height",
            "32", "--width", "48", "--quiet", "--dtype", "float32", "--output", str(out)]
    assert main(args + ["--timesteps", "1000", "500"]) == 0 and out.is_file()
    assert main(args + ["--timesteps", "500", "1000"]) == 2
    assert "strictly decreasing" in capsys.readouterr().err
