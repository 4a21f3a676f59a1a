"""Few-step distilled Wan checkpoints (FastWan, TurboWan: ``WanDMDPipeline``) and self-forcing causal Wan
(``WanCausalDMDPipeline``): the same Wan configs with a DMD recipe (``dmd``) and, for the causal
model, a block-causal one (``causal``). Numbers from SGLang diffusion's Wan pipeline and sampling
configs (its `configs/pipeline_configs/wan.py` and sample configs): every DMD stage there looks sigmas up on a shift-8 grid,
whatever the pipeline's own flow shift; self-forcing warps its timesteps on the shift-5 grid.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import attrs

from diffcore.configs.fewstep import CausalConfig, DmdConfig
from diffcore.errors import SamplingParamError

from .configs import Wan22I2VA14BConfig, Wan22TI2V5BConfig, WanConfig, WanSamplingParams


@attrs.define(kw_only=True)
class FastWan21T2VConfig(WanConfig):
    """FastVideo/FastWan2.1-T2V-1.3B-Diffusers: 3 DMD steps at 480x832."""

    cfg: str = "none"
    default_negative_prompt: Optional[str] = None
    recommended_flow_shift: Optional[float] = 8.0
    dmd: Optional[DmdConfig] = DmdConfig((1000, 757, 522), shift=8.0)


@attrs.define(kw_only=True)
class FastWan22TI2V5BConfig(Wan22TI2V5BConfig):
    """FastVideo/FastWan2.2-TI2V-5B(-FullAttn)-Diffusers: 3 DMD steps at 704x1280, 24 fps, optional first frame."""

    cfg: str = "none"
    default_negative_prompt: Optional[str] = None
    dmd: Optional[DmdConfig] = DmdConfig((1000, 757, 522), shift=8.0)


@attrs.define(kw_only=True)
class TurboWan21T2VConfig(FastWan21T2VConfig):
    """TurboWan 2.1 T2V 480P: 4 DMD steps."""

    dmd: Optional[DmdConfig] = DmdConfig((988, 932, 852, 608), shift=8.0)


@attrs.define(kw_only=True)
class TurboWan22I2VConfig(Wan22I2VA14BConfig):
    """TurboWan 2.2 I2V 720P (Wan 2.2 I2V-A14B distilled): 4 DMD steps, experts switching at t = 900."""

    cfg: str = "none"
    default_negative_prompt: Optional[str] = None
    dmd: Optional[DmdConfig] = DmdConfig((996, 932, 852, 608), shift=8.0)


@attrs.define(kw_only=True)
class SelfForcingWanConfig(WanConfig):
    """Self-forcing causal Wan 2.1 T2V 1.3B (e.g. SFWan2.1-T2V-1.3B in Diffusers format): blocks of 3 latent
    frames, 4 DMD steps per block warped on the shift-5 grid. ``num_frames_per_block`` / ``local_attn_size`` /
    ``sink_size`` in the transformer's config.json, if present, replace the defaults."""

    cfg: str = "none"
    default_negative_prompt: Optional[str] = None
    recommended_flow_shift: Optional[float] = 5.0
    dmd: Optional[DmdConfig] = DmdConfig((1000, 750, 500, 250), shift=5.0, warp=True)
    causal: Optional[CausalConfig] = CausalConfig()

    def configure_from_components(self, components: dict) -> None:
        super().configure_from_components(components)
        model = components.get("transformer")
        cfg = getattr(model, "config", None) or {}
        keys = ("num_frames_per_block", "local_attn_size", "sink_size")
        given = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        if given:
            self.causal = attrs.evolve(self.causal, **given)

    def resolve_size(self, req, components) -> None:
        """Wan's 4k+1 frames, and a whole number of blocks of latent frames."""
        super().resolve_size(req, components)
        n, k = self.causal.num_frames_per_block, self.vae_temporal_factor
        latent = self.latent_frames(req)
        if latent % n:
            fewer = max(latent // n, 1) * n
            raise SamplingParamError("num_frames", f"num_frames={req.num_frames} gives {latent} latent frames, which do "
                                                   f"not split into blocks of {n}; use num_frames={(fewer - 1) * k + 1} "
                                                   f"or {(fewer + n - 1) * k + 1}")


# ---- sampling defaults ------------------------------------------------------------------------------
class _NoCFGParams:
    def check_limits(self) -> None:
        super().check_limits()
        if self.guidance_scale > 1.0 or self.negative_prompt is not None:
            name = "guidance_scale" if self.guidance_scale > 1.0 else "negative_prompt"
            raise SamplingParamError(name, "this few-step distilled model samples without classifier-free guidance; "
                                           "leave guidance_scale at 1 and give no negative prompt")


@attrs.define(kw_only=True)
class FastWanSamplingParams(_NoCFGParams, WanSamplingParams):
    """FastWan2.1-T2V: 61 frames at 16 fps (``num_inference_steps`` is ignored: the DMD timesteps rule)."""

    num_frames: int = 61
    num_inference_steps: int = 3
    guidance_scale: float = 1.0


@attrs.define(kw_only=True)
class FastWan22TI2VSamplingParams(FastWanSamplingParams):
    num_frames: int = 121
    max_images: ClassVar[int] = 1


@attrs.define(kw_only=True)
class TurboWanSamplingParams(FastWanSamplingParams):
    num_frames: int = 81
    num_inference_steps: int = 4


@attrs.define(kw_only=True)
class TurboWanI2VSamplingParams(TurboWanSamplingParams):
    max_images: ClassVar[int] = 1
    min_images: ClassVar[int] = 1


@attrs.define(kw_only=True)
class SelfForcingSamplingParams(TurboWanSamplingParams):
    """81 frames (21 latent frames, 7 blocks of 3)."""


# ---- detection (distilled checkpoints keep the architecture of the model they come from) ------------------------------------------------------------------------------------
def is_two_expert_i2v(model_index, folder) -> bool:
    from .configs import _transformer, is_two_expert

    t = _transformer(folder)
    return is_two_expert(model_index, folder) and int(t.get("in_channels", 0)) > int(t.get("out_channels", 0))
