"""UniPC multistep sampler (Zhao et al. 2023): predictor UniP-p plus corrector UniC-p, in the
log-SNR variable lambda = log(alpha / sigma).

Numerically equivalent to Diffusers' ``UniPCMultistepScheduler`` for the flow configs Wan uses
(``use_flow_sigmas``, ``prediction_type="flow_prediction"``) and for the plain beta-schedule path
(epsilon / v_prediction / sample). Karras/exponential/beta sigmas, thresholding, ``solver_p`` and
zero-SNR rescaling are refused.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import SchedulerBase, stretch_to_terminal, time_shift


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squaredcos_cap_v2 (improved DDPM cosine) alpha-bar."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


class UniPCMultistepScheduler(SchedulerBase):
    """UniPC scheduler.

    Per request: ``set_timesteps(n, device)`` (resets all multistep history), then
    ``step(model_output, t, x)`` for each ``t`` in ``timesteps`` (int64, as in Diffusers).
    """

    diffusers_class_name = "UniPCMultistepScheduler"
    order = 1
    _missing_timestep_is_last = True

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector=(),
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        if solver_type in ("midpoint", "heun", "logrho"):  # legacy names Diffusers maps to bh2
            solver_type = "bh2"
        self._store_config(locals())
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "thresholding",
                     "rescale_betas_zero_snr"):
            if self.config[flag]:
                raise NotImplementedError(f"UniPCMultistepScheduler: {flag}=True is not supported by diffcore")
        if solver_p is not None:
            raise NotImplementedError("UniPCMultistepScheduler: solver_p is not supported by diffcore")
        if solver_type not in ("bh1", "bh2"):
            raise NotImplementedError(f"solver_type {solver_type!r} is not implemented")
        if solver_order < 1:
            raise ValueError("solver_order must be >= 1")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"timestep_spacing {timestep_spacing!r} is not supported")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal requires use_flow_sigmas=True")
        valid = ("epsilon", "sample", "v_prediction") + (("flow_prediction",) if predict_x0 else ())
        if prediction_type not in valid:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of {valid}")

        # The beta schedule only matters on the non-flow path, but Diffusers builds it regardless.
        n = num_train_timesteps
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self._reset()

    def flow_shift_key(self) -> str | None:
        return "flow_shift" if self.config["use_flow_sigmas"] else None

    def _reset(self) -> None:
        """Forget the multistep history of the previous request."""
        self.num_inference_steps: int | None = getattr(self, "num_inference_steps", None)
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self.this_order = 0
        self.last_sample: torch.Tensor | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ---- schedule -----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None):
        """Build ``timesteps`` (int64) and ``sigmas`` (float32, CPU, with the final sigma appended)
        and reset all state; custom ``sigmas`` are only accepted on the flow path."""
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when use_dynamic_shifting is True")
        if sigmas is not None:
            if not c.use_flow_sigmas:
                raise ValueError("custom sigmas require use_flow_sigmas=True")
            sigmas = np.asarray(sigmas)
            num_inference_steps = len(sigmas)
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps or sigmas")

        n_train, n = c.num_train_timesteps, num_inference_steps
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = n_train // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
        else:  # trailing
            timesteps = np.arange(n_train, 0, -n_train / n).round().copy().astype(np.int64) - 1

        if c.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / n_train, n + 1)[:-1]
            if c.use_dynamic_shifting:
                sigmas = time_shift(c.time_shift_type, mu, sigmas)
            else:
                sigmas = c.flow_shift * sigmas / (1 + (c.flow_shift - 1) * sigmas)
            if c.shift_terminal:
                sigmas = stretch_to_terminal(sigmas, c.shift_terminal)
            if np.fabs(sigmas[0] - 1) < 1e-6:  # keep lambda finite at the first step
                sigmas[0] -= 1e-6
            timesteps = (sigmas * n_train).copy()
            last = sigmas[-1] if c.final_sigmas_type == "sigma_min" else 0
        else:
            train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
            a0 = self.alphas_cumprod[0]
            last = ((1 - a0) / a0) ** 0.5 if c.final_sigmas_type == "sigma_min" else 0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

        self.sigmas = torch.from_numpy(sigmas)  # stays on CPU: indexed per step, moved as scalars
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset()

    # ---- math helpers -------------------------------------------------------------------------
    def _alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map the stored sigma to (alpha_t, sigma_t): flow x = (1-s) x0 + s n; VP uses s = sigma/alpha."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def _lambda(self, index: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, sigma = self._alpha_sigma(self.sigmas[index].to(device))
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def _x0(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The clean sample the model output predicts at the current step."""
        pt = self.config.prediction_type
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        if pt == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if pt == "sample":
            return model_output
        if pt == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return sample - sigma * model_output  # flow_prediction: v = noise - x0

    def predicted_x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """The clean sample this step's model output predicts (previews), before ``step``; changes nothing
        ``step`` reads."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._x0(model_output, sample)

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Turn the network output into the x0 prediction (predict_x0) or the noise prediction."""
        pt = self.config.prediction_type
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        if self.predict_x0:
            return self._x0(model_output, sample)
        if pt == "epsilon":
            return model_output
        if pt == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample  # v_prediction

    def _coefficients(self, t_idx: int, s0_idx: int, order: int, device):
        """Shared UniP/UniC quantities for a step from sigma[s0_idx] to sigma[t_idx] using the last
        ``order`` stored model outputs: the divided differences D1s, the Vandermonde-like system (R, b)
        in the step ratios r_k, phi_1 and the B(h) normaliser."""
        alpha_t, sigma_t, lam_t = self._lambda(t_idx, device)
        alpha_s0, sigma_s0, lam_s0 = self._lambda(s0_idx, device)
        h = lam_t - lam_s0
        m0 = self.model_outputs[-1]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lambda(s0_idx - k, device)[2] - lam_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks.append(torch.ones((), device=device))
        rks = torch.stack(rks)

        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b, fact = [], [], 1
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        d1s = torch.stack(d1s, dim=1) if d1s else None
        return dict(alpha_t=alpha_t, sigma_t=sigma_t, alpha_s0=alpha_s0, sigma_s0=sigma_s0, m0=m0, d1s=d1s,
                    R=torch.stack(R), b=torch.stack(b), h_phi_1=h_phi_1, b_h=b_h)

    def _base_update(self, x: torch.Tensor, k: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """First-order (DDIM-like) part of the update and the scale of the higher-order residual."""
        if self.predict_x0:
            return k["sigma_t"] / k["sigma_s0"] * x - k["alpha_t"] * k["h_phi_1"] * k["m0"], k["alpha_t"] * k["b_h"]
        return k["alpha_t"] / k["alpha_s0"] * x - k["sigma_t"] * k["h_phi_1"] * k["m0"], k["sigma_t"] * k["b_h"]

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-p: extrapolate from sigma[i] to sigma[i+1]."""
        k = self._coefficients(self._step_index + 1, self._step_index, order, x.device)
        x_t, scale = self._base_update(x, k)
        if k["d1s"] is not None:
            if order == 2:
                rhos = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
            else:
                rhos = torch.linalg.solve(k["R"][:-1, :-1], k["b"][:-1]).to(x.device).to(x.dtype)
            x_t = x_t - scale * torch.einsum("k,bkc...->bc...", rhos, k["d1s"])
        # order 1 adds nothing; Diffusers multiplies 0 by B(h) there, which is NaN for bh1 when the
        # final sigma is 0 (B(h) = -inf), so the term is skipped instead.
        return x_t.to(x.dtype)

    def _correct(self, model_t: torch.Tensor, last_sample: torch.Tensor, this_sample: torch.Tensor, order: int):
        """UniC-p: redo the previous step sigma[i-1] -> sigma[i] using the new model output at sigma[i]."""
        k = self._coefficients(self._step_index, self._step_index - 1, order, this_sample.device)
        x = last_sample
        if order == 1:
            rhos = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
        else:
            rhos = torch.linalg.solve(k["R"], k["b"]).to(x.device).to(x.dtype)
        x_t, scale = self._base_update(x, k)
        corr = rhos[-1] * (model_t - k["m0"])
        if k["d1s"] is not None:
            corr = torch.einsum("k,bkc...->bc...", rhos[:-1], k["d1s"]) + corr
        return (x_t - scale * corr).to(x.dtype)

    # ---- sampling -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None) -> torch.Tensor:
        """Correct the current sample with UniC (from the second step on), then predict the next one."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i, c = self._step_index, self.config
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None

        m = self.convert_model_output(model_output, sample)
        if use_corrector:
            sample = self._correct(m, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [m]

        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up: not enough history yet
        self.last_sample = sample
        prev_sample = self._predict(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return prev_sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``alpha_t * x0 + sigma_t * noise`` at ``timesteps`` (video-to-video)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule = self.timesteps.to(original_samples.device)
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(t, schedule) for t in timesteps]
        elif self._step_index is not None:
            idx = [self._step_index] * timesteps.shape[0]
        else:
            idx = [self._begin_index] * timesteps.shape[0]
        sigma = sigmas[idx].flatten()
        sigma = sigma.reshape(sigma.shape + (1,) * (original_samples.ndim - sigma.ndim))
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
