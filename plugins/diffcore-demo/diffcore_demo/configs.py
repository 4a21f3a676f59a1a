"""The demo model's defaults: FLUX.1-schnell layout (no guidance embedding) at 128x128 in float32."""
from __future__ import annotations

from typing import ClassVar, Optional

import attrs

from diffcore_flux.configs import FluxSchnellConfig, FluxSchnellSamplingParams


@attrs.define(kw_only=True)
class DemoConfig(FluxSchnellConfig):
    """Weights are stored in float16 (half the download); they run in float32, which is exact and,
    at this size, as fast as bfloat16 on a CPU."""

    default_dtype: str = "float32"
    # Trained with 10% empty captions, so true CFG against "" sharpens colour and outline (measured in
    # the package README: circle-vs-square 72% -> 90% on 96 fresh captions at scale 2.5).
    default_negative_prompt: Optional[str] = ""

    def default_size(self, components: dict) -> tuple[int, int]:
        return 128, 128


@attrs.define(kw_only=True)
class DemoSamplingParams(FluxSchnellSamplingParams):
    """128x128 (the training size: 8x8 image tokens), 20 Euler steps with true CFG 2.5 against the empty
    caption; the text encoder saw 12 tokens."""

    height: int = 128
    width: int = 128
    num_inference_steps: int = 20
    guidance_scale: float = 0.0
    true_cfg_scale: float = 2.5
    max_sequence_length: int = 12
    max_sequence_length_limit: ClassVar[int] = 512
