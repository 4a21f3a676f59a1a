"""Parity of diffcore's flow schedulers with Diffusers (the numerics oracle): schedules and full
denoising loops driven by a deterministic smooth fake model, compared step by step in float32."""
from __future__ import annotations

import copy
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler as RefFlowMatch,
)
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler as RefUniPC

from diffcore.errors import ConfigFileError
from diffcore.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler
from diffcore.schedulers.unipc import UniPCMultistepScheduler

TOL = 1e-6
STEPS = [2, 10, 28, 50]

FLUX_DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL = dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096)
QWEN_IMAGE = dict(_class_name="FlowMatchEulerDiscreteScheduler", _diffusers_version="0.34.0.dev0",
                  base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                  max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                  stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                  use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)
LINEAR_SHIFT = dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5, max_shift=1.15)
STATIC_SHIFT = dict(shift=3.0)
WAN = dict(_class_name="UniPCMultistepScheduler", _diffusers_version="0.33.0.dev0", beta_end=0.02,
           beta_schedule="linear", beta_start=0.0001, disable_corrector=[], dynamic_thresholding_ratio=0.995,
           final_sigmas_type="zero", flow_shift=3.0, lower_order_final=True, num_train_timesteps=1000,
           predict_x0=True, prediction_type="flow_prediction", rescale_betas_zero_snr=False,
           sample_max_value=1.0, solver_order=2, solver_p=None, solver_type="bh2", steps_offset=0,
           thresholding=False, timestep_spacing="linspace", trained_betas=None, use_beta_sigmas=False,
           use_exponential_sigmas=False, use_flow_sigmas=True, use_karras_sigmas=False)


def ref_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def fake_model(sample: torch.Tensor, t) -> torch.Tensor:
    """Smooth, timestep-dependent stand-in for a denoiser (deterministic)."""
    tf = float(t) / 1000.0
    return 0.7 * torch.tanh(sample) + 0.3 * torch.sin(1.3 * sample + tf) - 0.2 * sample * tf


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def run_loop(sched, x: torch.Tensor, ref: bool, model=fake_model, steps=None) -> list[torch.Tensor]:
    outs = []
    for t in sched.timesteps[:steps]:
        out = sched.step(model(x, t), t, x)
        x = out.prev_sample if ref else out
        outs.append(x)
    return outs


def assert_same_schedule(ours, theirs):
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert ours.timesteps.shape == theirs.timesteps.shape and ours.sigmas.shape == theirs.sigmas.shape
    assert max_diff(ours.timesteps, theirs.timesteps) <= TOL * max(1.0, theirs.timesteps.abs().max().item())
    assert max_diff(ours.sigmas, theirs.sigmas) <= TOL


def assert_same_loop(ours_outs, ref_outs, tol=TOL):
    assert len(ours_outs) == len(ref_outs)
    for i, (a, b) in enumerate(zip(ours_outs, ref_outs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.isfinite(a).all(), f"step {i} not finite"
        assert max_diff(a, b) <= tol, f"step {i}: max|diff| {max_diff(a, b):.3e}"


def x_init(shape=(2, 24, 16), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler
# ------------------------------------------------------------------------------------------------
def flow_pair(cfg):
    return FlowMatchEulerDiscreteScheduler.from_config(cfg), RefFlowMatch(**ref_config(cfg))


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name,cfg,seq_len", [
    ("flux-dev-1024", FLUX_DEV, 4096), ("flux-dev-512", FLUX_DEV, 1024), ("flux-schnell", FLUX_SCHNELL, 4096),
    ("qwen-image", QWEN_IMAGE, 4096), ("qwen-image-large", QWEN_IMAGE, 6032), ("linear", LINEAR_SHIFT, 2048),
])
def test_flow_match_pipeline_sigmas(name, cfg, seq_len, n):
    """The FLUX / Qwen-Image pipeline call: sigmas = linspace(1, 1/N, N) and mu from the token count."""
    ours, ref = flow_pair(cfg)
    c = ref.config
    mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    assert ours.compute_mu(seq_len) == pytest.approx(mu, rel=1e-12, abs=1e-12)
    sigmas = np.linspace(1.0, 1 / n, n)
    ours.set_timesteps(sigmas=sigmas, mu=ours.compute_mu(seq_len))
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    assert_same_schedule(ours, ref)
    if cfg.get("shift_terminal"):
        assert ours.sigmas[-2].item() == pytest.approx(cfg["shift_terminal"], abs=1e-6)
    x = x_init()
    assert_same_loop(run_loop(ours, x, False), run_loop(ref, x, True))


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name,cfg", [
    ("static-shift-3", STATIC_SHIFT), ("schnell", FLUX_SCHNELL), ("karras", dict(shift=3.0, use_karras_sigmas=True)),
    ("exponential-sigmas", dict(shift=3.0, use_exponential_sigmas=True)), ("invert", dict(shift=2.0, invert_sigmas=True)),
    ("terminal", dict(shift=3.0, shift_terminal=0.1)),
])
def test_flow_match_num_steps(name, cfg, n):
    """set_timesteps(n): the default float64 linspace between the training schedule's ends."""
    ours, ref = flow_pair(cfg)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert_same_schedule(ours, ref)
    x = x_init(seed=n)
    assert_same_loop(run_loop(ours, x, False), run_loop(ref, x, True))


def test_flow_match_custom_timesteps():
    ours, ref = flow_pair(STATIC_SHIFT)
    ts = [1000.0, 750.0, 500.0, 250.0]
    ours.set_timesteps(timesteps=ts)
    ref.set_timesteps(timesteps=ts)
    assert_same_schedule(ours, ref)
    sig = [1.0, 0.6, 0.3, 0.1]
    ours.set_timesteps(sigmas=sig, timesteps=ts)
    ref.set_timesteps(sigmas=sig, timesteps=ts)
    assert_same_schedule(ours, ref)
    x = x_init()
    assert_same_loop(run_loop(ours, x, False), run_loop(ref, x, True))


def test_flow_match_low_precision_dtype_behaviour():
    """bf16 inputs: Diffusers upcasts the sample to float32 and casts the result to model_output's dtype."""
    ours, ref = flow_pair(FLUX_DEV)
    mu = ours.compute_mu(1024)
    for s in (ours, ref):
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    model = lambda x, t: fake_model(x.float(), t).to(torch.bfloat16)  # noqa: E731
    x = x_init().to(torch.bfloat16)
    a, b = run_loop(ours, x, False, model), run_loop(ref, x, True, model)
    assert all(o.dtype == torch.bfloat16 for o in a)
    assert_same_loop(a, b, tol=0.0)


def test_flow_match_scale_noise_and_begin_index():
    """img2img: scale_noise at a mid-schedule timestep, then denoise from begin_index."""
    ours, ref = flow_pair(FLUX_DEV)
    mu = ours.compute_mu(4096)
    n, strength = 28, 0.6
    for s in (ours, ref):
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    start = n - int(n * strength)
    x0, noise = x_init(seed=1), x_init(seed=2)
    t0 = ours.timesteps[start:start + 1].repeat(2)
    # lookup by value (no begin index)
    assert max_diff(ours.scale_noise(x0, t0, noise), ref.scale_noise(x0, t0, noise)) <= TOL
    for s in (ours, ref):
        s.set_begin_index(start)
    xo, xr = ours.scale_noise(x0, t0, noise), ref.scale_noise(x0, t0, noise)
    assert max_diff(xo, xr) <= TOL
    sigma = ours.sigmas[start]
    assert max_diff(xo, sigma * noise + (1 - sigma) * x0) <= TOL
    outs_o = [ours.step(fake_model(xo, t), t, xo) for t in ours.timesteps[start:start + 1]]
    outs_r = [ref.step(fake_model(xr, t), t, xr).prev_sample for t in ref.timesteps[start:start + 1]]
    assert ours.step_index == ref.step_index == start + 1
    assert_same_loop(outs_o, outs_r)


def test_flow_match_state_and_errors():
    ours = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV)
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(4)
    ours.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=1.0)
    x = x_init()
    with pytest.raises(ValueError, match="integer"):
        ours.step(x, 3, x)
    first = run_loop(ours, x, False)
    assert ours.step_index == 4
    ours.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=1.0)
    assert ours.step_index is None and ours.begin_index is None
    fresh = copy.deepcopy(ours)  # what TimestepPreparationStage gives each request
    fresh.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=1.0)
    assert_same_loop(run_loop(fresh, x, False), first, tol=0.0)
    assert_same_loop(run_loop(ours, x, False), first, tol=0.0)
    for bad in (dict(use_beta_sigmas=True), dict(stochastic_sampling=True)):
        with pytest.raises(NotImplementedError):
            FlowMatchEulerDiscreteScheduler(**bad)
    with pytest.raises(ValueError):
        FlowMatchEulerDiscreteScheduler(time_shift_type="cubic")
    assert FlowMatchEulerDiscreteScheduler.diffusers_class_name == "FlowMatchEulerDiscreteScheduler"
    assert ours.order == 1 and ours.init_noise_sigma == 1.0
    assert ours.config.shift == 3.0 and ours.config.get("max_image_seq_len") == 4096


def test_from_config_warns_once_on_unknown_keys(caplog):
    cfg = {**QWEN_IMAGE, "some_future_key": 1}
    with caplog.at_level(logging.WARNING, logger="diffcore.schedulers.base"):
        FlowMatchEulerDiscreteScheduler.from_config(cfg)
        FlowMatchEulerDiscreteScheduler.from_config(cfg)
    hits = [r for r in caplog.records if "some_future_key" in r.getMessage()]
    assert len(hits) == 1
    assert not any("_class_name" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# UniPCMultistepScheduler
# ------------------------------------------------------------------------------------------------
def unipc_pair(cfg):
    return UniPCMultistepScheduler.from_config(cfg), RefUniPC(**ref_config(cfg))


def video_init(seed=0):
    return x_init((1, 4, 3, 6, 5), seed)  # (B, C, F, H, W) like Wan latents


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("flow_shift", [3.0, 5.0, 8.0])
def test_unipc_wan(flow_shift, n):
    ours, ref = unipc_pair({**WAN, "flow_shift": flow_shift})
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert_same_schedule(ours, ref)
    x = video_init(n)
    assert_same_loop(run_loop(ours, x, False), run_loop(ref, x, True))


@pytest.mark.parametrize("n", [2, 10, 28])
@pytest.mark.parametrize("name,extra", [
    ("order1", dict(solver_order=1)), ("order3", dict(solver_order=3)),
    ("order3-no-lof", dict(solver_order=3, lower_order_final=False, final_sigmas_type="zero")),
    ("disable-corrector", dict(disable_corrector=[0, 1, 4])), ("legacy-midpoint", dict(solver_type="midpoint")),
    ("dynamic-shift", dict(use_dynamic_shifting=True)), ("shift-terminal", dict(shift_terminal=0.05)),
    ("eps-linear", dict(use_flow_sigmas=False, prediction_type="epsilon")),
    ("v-scaled-trailing", dict(use_flow_sigmas=False, prediction_type="v_prediction",
                               beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                               timestep_spacing="trailing")),
    ("sample-cos-leading", dict(use_flow_sigmas=False, prediction_type="sample", beta_schedule="squaredcos_cap_v2",
                                timestep_spacing="leading", steps_offset=1, final_sigmas_type="sigma_min")),
    ("eps-noise-pred-bh1", dict(use_flow_sigmas=False, prediction_type="epsilon", predict_x0=False,
                                solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min")),
])
def test_unipc_variants(name, extra, n):
    cfg = {**WAN, **extra}
    ours, ref = unipc_pair(cfg)
    mu = 0.8 if cfg.get("use_dynamic_shifting") else None
    ours.set_timesteps(n, mu=mu)
    ref.set_timesteps(n, mu=mu)
    assert_same_schedule(ours, ref)
    x = video_init(n)
    steps = None
    if name == "order3-no-lof":  # Diffusers divides by an infinite h at the final zero sigma (inf/NaN)
        steps = n - 1
    assert_same_loop(run_loop(ours, x, False, steps=steps), run_loop(ref, x, True, steps=steps))


@pytest.mark.parametrize("n", [2, 10, 28])
def test_unipc_flow_bh1_final_step(n):
    """bh1 + final sigma 0: Diffusers returns NaN on the last step (0 * B(h) with B(h) = -inf); we match
    every other step and return the exact x0 prediction on the last one."""
    ours, ref = unipc_pair({**WAN, "solver_type": "bh1"})
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    x = video_init(n)
    a, b = run_loop(ours, x, False), run_loop(ref, x, True)
    assert_same_loop(a[:-1], b[:-1])
    assert torch.isnan(b[-1]).any()  # documents the Diffusers behaviour we deliberately do not copy
    x_last = a[-2]  # input of the last step; its x0 prediction is the exact flow endpoint
    assert max_diff(a[-1], x_last - ours.sigmas[-2] * fake_model(x_last, ours.timesteps[-1])) <= TOL


def test_unipc_custom_sigmas_and_dynamic_mu():
    cfg = {**WAN, "use_dynamic_shifting": True, "time_shift_type": "linear"}
    ours, ref = unipc_pair(cfg)
    sig = np.linspace(1.0, 0.05, 12)
    ours.set_timesteps(sigmas=sig, mu=1.3)
    ref.set_timesteps(sigmas=sig.copy(), mu=1.3)
    assert_same_schedule(ours, ref)
    x = video_init()
    assert_same_loop(run_loop(ours, x, False), run_loop(ref, x, True))


def test_unipc_reuse_copy_and_state_reset():
    """set_timesteps resets the multistep history, so one instance serves consecutive requests."""
    ours = UniPCMultistepScheduler.from_config(WAN)
    x = video_init()
    ours.set_timesteps(10)
    first = run_loop(ours, x, False)
    ours.set_timesteps(6)  # a different request in between
    run_loop(ours, video_init(3), False, steps=3)
    ours.set_timesteps(10)
    assert ours.step_index is None and ours.last_sample is None and ours.lower_order_nums == 0
    assert all(m is None for m in ours.model_outputs)
    assert_same_loop(run_loop(ours, x, False), first, tol=0.0)
    fresh = copy.deepcopy(ours)  # what TimestepPreparationStage gives each request
    assert fresh is not ours and dict(fresh.config) == dict(ours.config)
    fresh.set_timesteps(10)
    assert_same_loop(run_loop(fresh, x, False), first, tol=0.0)


def test_unipc_add_noise_and_errors():
    ours, ref = unipc_pair(WAN)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    x0, noise = video_init(1), video_init(2)
    t = ours.timesteps[5:6]
    assert max_diff(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) <= TOL
    fresh = UniPCMultistepScheduler.from_config(WAN)
    with pytest.raises(ValueError):
        fresh.step(x0, 999, x0)
    for bad in (dict(use_karras_sigmas=True), dict(thresholding=True), dict(rescale_betas_zero_snr=True)):
        with pytest.raises(ConfigFileError, match=f"{next(iter(bad))}=True is not supported by diffcore"):
            UniPCMultistepScheduler.from_config({**WAN, **bad})  # from a config: names the file
    with pytest.raises(NotImplementedError):
        UniPCMultistepScheduler(solver_type="bh3")
    with pytest.raises(ValueError):
        UniPCMultistepScheduler(prediction_type="flow_prediction", predict_x0=False, use_flow_sigmas=True)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        UniPCMultistepScheduler().set_timesteps(sigmas=[1.0, 0.5])
    assert UniPCMultistepScheduler.diffusers_class_name == "UniPCMultistepScheduler"
    assert ours.timesteps.dtype == torch.int64 and ours.sigmas.device.type == "cpu"


@pytest.mark.parametrize("cls,ref_cls,cfg,key", [
    (UniPCMultistepScheduler, RefUniPC, WAN, "flow_shift"),
    (FlowMatchEulerDiscreteScheduler, RefFlowMatch, FLUX_SCHNELL, "shift"),
], ids=["unipc-flow", "flow-match-static"])
def test_with_flow_shift_equals_diffusers_from_config(cls, ref_cls, cfg, key):
    """A request's flow_shift is diffusers' ``Scheduler.from_config(config, flow_shift=...)``; the original is untouched."""
    from diffcore.schedulers.base import with_flow_shift

    original = cls.from_config(cfg)
    shifted = with_flow_shift(original, 7.0)
    assert shifted is not original and original.config[key] == cfg[key] and shifted.config[key] == 7.0
    ref = ref_cls.from_config({**cfg, key: 7.0})
    shifted.set_timesteps(10)
    ref.set_timesteps(10)
    assert_same_schedule(shifted, ref)


def test_with_flow_shift_refuses_schedules_without_a_fixed_shift():
    from diffcore.errors import SamplingParamError
    from diffcore.schedulers.base import with_flow_shift

    with pytest.raises(SamplingParamError, match="use_dynamic_shifting"):
        with_flow_shift(FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV), 3.0)
    with pytest.raises(SamplingParamError, match="has no flow shift"):
        with_flow_shift(UniPCMultistepScheduler.from_config({**WAN, "use_flow_sigmas": False,
                                                             "prediction_type": "epsilon"}), 3.0)
