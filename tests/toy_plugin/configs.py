"""Toy PipelineConfig / SamplingParams: CLIP text features, packed 2x2 latents, CFG with an empty negative."""
from __future__ import annotations

from typing import ClassVar, Optional

import attrs
import torch

from diffcore.configs import PipelineConfig, SamplingParams
from diffcore.request import PromptEmbeds


def is_toy_large(model_index, folder) -> bool:
    return model_index.extra.get("toy_variant") == "large"


@attrs.define(kw_only=True)
class ToyConfig(PipelineConfig):
    default_dtype: str = "bfloat16"
    component_dtypes: dict = attrs.field(factory=lambda: {"vae": "float32"})
    cfg: str = "cfg"
    default_negative_prompt: str = ""
    select_rows: bool = True  # condition_rows narrows the unconditional call to the rows that need it

    def guidance_active(self, params, step, t) -> bool:
        """A "CFG only in the first ``cfg_steps`` steps" policy (per row), to test the core's per-step hook."""
        return params.cfg_steps is None or step < params.cfg_steps

    def condition_rows(self, kwargs, rows, req):
        if not self.select_rows:
            return None
        index = torch.tensor(rows)
        return {k: v[index] for k, v in kwargs.items()}

    def guidance_branches(self, req, step, t) -> tuple[str, ...]:
        """An extra branch (the prompt's features zeroed) when a row sets ``zero_prompt_scale``, to test the core's
        multi-branch guidance hooks."""
        return ("zero_prompt",) if "zero_prompt" in req.condition else ()

    def combine_predictions(self, preds, rows, latents, t, req, expert):
        out = super().combine_predictions(preds, rows, latents, t, req, expert)
        if "zero_prompt" not in preds:
            return out
        from diffcore.configs.pipeline_config import broadcast_rows, row_scale

        scale = broadcast_rows(row_scale(req.per_row("zero_prompt_scale")), out)
        return out + scale * (preds["cond"] - preds["zero_prompt"])

    def default_size(self, components) -> tuple[int, int]:
        return 32, 32

    def encode_prompts(self, components, prompts, req) -> PromptEmbeds:
        encoder, tokenizer = components["text_encoder"], components["tokenizer"]
        n = min(req.params.max_sequence_length, tokenizer.model_max_length)
        ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = encoder(ids.to(encoder.device))
        return PromptEmbeds(embeds=out.last_hidden_state, pooled=out.pooler_output)

    def prepare_condition(self, components, req) -> dict:
        dtype = components["transformer"].dtype

        def kwargs(p: PromptEmbeds) -> dict:
            return dict(encoder_hidden_states=p.embeds.to(dtype), pooled_projections=p.pooled.to(dtype))

        neg = req.negative_prompt_embeds
        branches = {"cond": kwargs(req.prompt_embeds), "uncond": kwargs(neg) if neg is not None else None}
        if any(s for s in req.per_row("zero_prompt_scale")):
            cond = branches["cond"]
            branches["zero_prompt"] = dict(cond, encoder_hidden_states=0 * cond["encoder_hidden_states"])
        return branches


@attrs.define(kw_only=True)
class ToyLargeConfig(ToyConfig):
    default_dtype: str = "float32"


@attrs.define(kw_only=True)
class ToySamplingParams(SamplingParams):
    # Plain overrides on purpose: the base validators must still apply.
    height: int = 32
    width: int = 32
    num_inference_steps: int = 2
    guidance_scale: float = 3.0
    max_sequence_length: int = 16
    max_sequence_length_limit: ClassVar[int] = 77
    cfg_steps: Optional[int] = None  # run the unconditional branch only in the first cfg_steps steps
    zero_prompt_scale: float = 0.0  # an extra guidance branch (ToyConfig.guidance_branches) when > 0


@attrs.define(kw_only=True)
class ToyLargeSamplingParams(ToySamplingParams):
    num_inference_steps: int = 3


@attrs.define(kw_only=True)
class ToyEditSamplingParams(ToySamplingParams):
    """An edit model's limits: exactly one input image."""

    max_images: ClassVar[int] = 1
    min_images: ClassVar[int] = 1
