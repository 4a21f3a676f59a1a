"""Euler sampler for rectified-flow models (FLUX, Qwen-Image, SD3): x_{i+1} = x_i + (s_{i+1} - s_i) * v.

Numerically equivalent to Diffusers' ``FlowMatchEulerDiscreteScheduler`` (deterministic path): the
schedule is built in numpy in the same precision as Diffusers (float64 for the default linspace,
float32 for caller-given sigmas/timesteps), then stored as float32 torch tensors.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import SchedulerBase, stretch_to_terminal, time_shift


class FlowMatchEulerDiscreteScheduler(SchedulerBase):
    """Flow-matching Euler scheduler.

    Per request: ``set_timesteps(sigmas=..., mu=compute_mu(seq_len))`` (dynamic shifting) or
    ``set_timesteps(n)``; then ``step(v, t, x)`` for each ``t`` in ``timesteps``.
    """

    diffusers_class_name = "FlowMatchEulerDiscreteScheduler"
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        self._store_config(locals())
        if use_beta_sigmas:
            raise NotImplementedError("FlowMatchEulerDiscreteScheduler: use_beta_sigmas is not supported by diffcore")
        if stochastic_sampling:
            raise NotImplementedError("FlowMatchEulerDiscreteScheduler: stochastic_sampling is not supported by diffcore")
        if use_karras_sigmas and use_exponential_sigmas:
            raise ValueError("Only one of use_karras_sigmas / use_exponential_sigmas can be set")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")

        # Training schedule (float32, like Diffusers); only its ends matter: they bound the default
        # inference linspace when neither sigmas nor timesteps are given.
        n = num_train_timesteps
        sigmas = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * n
        self.sigmas = sigmas
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        self._shift = shift
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ---- shift --------------------------------------------------------------------------------
    def flow_shift_key(self) -> str:
        return "shift"

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def compute_mu(self, image_seq_len: int) -> float:
        """Dynamic-shift ``mu``: linear in the image token count, from (base_image_seq_len, base_shift)
        to (max_image_seq_len, max_shift) -- what FLUX / Qwen-Image pipelines call ``calculate_shift``."""
        c = self.config
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        b = c.base_shift - m * c.base_image_seq_len
        return image_seq_len * m + b

    # ---- schedule -----------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas=None,
        mu: float | None = None,
        timesteps=None,
    ) -> None:
        """Build ``timesteps`` (float32, sigma * num_train_timesteps) and ``sigmas`` (plus a terminal 0,
        or 1 when ``invert_sigmas``); resets the step state."""
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when use_dynamic_shifting is True")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` must have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                timesteps is not None and len(timesteps) != num_inference_steps
            ):
                raise ValueError("`sigmas`/`timesteps` must have num_inference_steps entries")
        elif sigmas is not None or timesteps is not None:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        else:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        self.num_inference_steps = num_inference_steps

        n_train = c.num_train_timesteps
        given_timesteps = timesteps is not None
        if given_timesteps:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps)
            sigmas = timesteps / n_train
        else:
            sigmas = np.array(sigmas).astype(np.float32)

        if c.use_dynamic_shifting:
            sigmas = time_shift(c.time_shift_type, mu, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if c.shift_terminal:
            sigmas = stretch_to_terminal(sigmas, c.shift_terminal)
        if c.use_karras_sigmas:  # rho = 7 interpolation between the schedule's ends (EDM)
            lo, hi, rho = sigmas[-1].item(), sigmas[0].item(), 7.0
            ramp = np.linspace(0, 1, len(sigmas))
            sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        elif c.use_exponential_sigmas:  # log-uniform between the schedule's ends
            lo, hi = sigmas[-1].item(), sigmas[0].item()
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), len(sigmas)))

        sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32, device=device)
        if given_timesteps:
            timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32, device=device)
        else:
            timesteps = sigmas * n_train

        if c.invert_sigmas:  # Mochi: denoise on 1 - sigma
            sigmas = 1.0 - sigmas
            timesteps = sigmas * n_train
            sigmas = torch.cat([sigmas, torch.ones(1, device=sigmas.device)])
        else:
            sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])

        self.timesteps = timesteps
        self.sigmas = sigmas
        self._step_index = None
        self._begin_index = None

    # ---- sampling -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None) -> torch.Tensor:
        """One Euler step; the update is done in float32 and cast back to ``model_output.dtype``.
        ``timestep`` must be an element of ``timesteps`` (not a loop index)."""
        if isinstance(timestep, int) or (
            isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)
        ):
            raise ValueError("pass one of scheduler.timesteps as `timestep`, not an integer index")
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        dt = self.sigmas[self._step_index + 1] - self.sigmas[self._step_index]
        prev_sample = sample + dt * model_output
        self._step_index += 1
        return prev_sample.to(model_output.dtype)

    def predicted_x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """The clean sample this step's velocity predicts, ``x - sigma * v`` (previews), before ``step``;
        changes nothing ``step`` reads."""
        if self._step_index is None:
            self._init_step_index(timestep)
        x0 = sample.to(torch.float32) - self.sigmas[self._step_index] * model_output
        return x0.to(model_output.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward flow process ``sigma * noise + (1 - sigma) * sample`` at ``timestep`` (img2img, inpaint)."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        schedule = self.timesteps.to(sample.device)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t, schedule) for t in timestep]
        elif self._step_index is not None:  # called after the first denoising step (inpainting)
            idx = [self._step_index] * timestep.shape[0]
        else:  # called before the first step (img2img start latent)
            idx = [self._begin_index] * timestep.shape[0]
        sigma = sigmas[idx].flatten()
        sigma = sigma.reshape(sigma.shape + (1,) * (sample.ndim - sigma.ndim))
        return sigma * noise + (1.0 - sigma) * sample
