"""Recipes of few-step (DMD-distilled) and causal (self-forcing) checkpoints: records a PipelineConfig
carries as ``dmd`` / ``causal`` and the DMD / causal denoising stages read."""
from __future__ import annotations

import attrs

from ..errors import ConfigError


def _positive(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{attribute.name} must be a positive number, got {value!r}")


@attrs.frozen
class DmdConfig:
    """The few-step recipe of a distilled checkpoint.

    ``timesteps``: the integer timesteps the student was distilled for (noisy to clean, e.g.
    ``(1000, 757, 522)``); ``shift``: the flow shift of the sigma grid (per request: ``flow_shift``);
    ``warp``: first map each timestep ``t`` to the shifted grid's ``t``-th timestep (self-forcing Wan:
    ``[1000, 750, 500, 250]`` -> ``[1000, 937.5, 833.3, 625]`` at shift 5).
    """

    timesteps: tuple = attrs.field(converter=tuple)
    shift: float = attrs.field(default=8.0, validator=_positive)
    warp: bool = False


@attrs.frozen
class CausalConfig:
    """Block-causal generation (self-forcing): latent frames are denoised ``num_frames_per_block`` at a
    time, each block attending to a KV cache of the clean earlier blocks.

    ``local_attn_size``: how many latent frames the self-attention cache holds (-1: all of them);
    when full, the oldest frames after the first ``sink_size`` ("sink") frames are dropped.
    ``context_timestep``: the timestep of the extra pass that writes a finished block's clean K/V.
    """

    num_frames_per_block: int = 3
    local_attn_size: int = -1
    sink_size: int = 0
    context_timestep: float = 0.0

    def __attrs_post_init__(self):
        n, w, s = self.num_frames_per_block, self.local_attn_size, self.sink_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_frames_per_block must be a positive integer, got {n!r}")
        if not isinstance(s, int) or s < 0:
            raise ConfigError(f"sink_size must be a non-negative integer, got {s!r}")
        if w != -1 and (not isinstance(w, int) or w < s + n):
            raise ConfigError(f"local_attn_size must be -1 (unbounded) or at least sink_size + num_frames_per_block "
                              f"= {s + n} latent frames, got {w!r}")
