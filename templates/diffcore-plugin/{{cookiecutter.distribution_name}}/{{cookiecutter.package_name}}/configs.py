"""{{ cookiecutter.family }} configs: the per-model hooks the core stages call, and sampling defaults.

{{ cookiecutter.class_prefix }}Config covers what differs between model families: how a prompt is
encoded (CLIP: per-token states for cross-attention, the pooled state for AdaLN), the latent layout
(the transformer patchifies (B, C, H, W) latents itself, so nothing is packed here), and what the
transformer takes besides latents and timestep.
"""
from __future__ import annotations

from typing import ClassVar

import attrs

from diffcore.configs import PipelineConfig, SamplingParams
from diffcore.request import PromptEmbeds


@attrs.define(kw_only=True)
class {{ cookiecutter.class_prefix }}Config(PipelineConfig):
    default_dtype: str = "bfloat16"
    latent_patch: int = 1  # latents stay (B, C, H, W); the transformer's patch embedding makes tokens
    patch_size: int = 2  # the transformer's; read from its config when loaded
    cfg: str = "cfg"  # classic classifier-free guidance when guidance_scale > 1
    default_negative_prompt: str = ""  # the unconditional branch encodes an empty prompt

    def configure_from_components(self, components: dict) -> None:
        super().configure_from_components(components)  # vae_scale_factor from the VAE's config
        config = getattr(components.get("transformer"), "config", None) or {}
        self.patch_size = config.get("patch_size", self.patch_size)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def image_seq_len(self, req) -> int:
        return (req.height // self.size_multiple) * (req.width // self.size_multiple)

    def encode_prompts(self, components: dict, prompts: list[str], req) -> PromptEmbeds:
        import torch

        tokenizer, encoder = components["tokenizer"], components["text_encoder"]
        length = min(req.params.max_sequence_length, tokenizer.model_max_length)
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = encoder(ids.to(encoder.device))
        return PromptEmbeds(embeds=out.last_hidden_state.to(req.device), pooled=out.pooler_output.to(req.device))

    def prepare_condition(self, components: dict, req) -> dict:
        dtype = components["transformer"].dtype

        def kwargs(p: PromptEmbeds) -> dict:
            return {"encoder_hidden_states": p.embeds.to(dtype), "pooled_projections": p.pooled.to(dtype)}

        neg = req.negative_prompt_embeds
        return {"cond": kwargs(req.prompt_embeds), "uncond": kwargs(neg) if neg is not None else None}

    # The per-step guidance policy: ``guidance_active(params, step, t)`` (default: every step) says per row
    # whether the unconditional branch runs (e.g. Z-Image's cfg_truncation, CFG in the first k steps only);
    # ``condition_rows`` lets the denoising loop call the transformer for just those rows.
    def condition_rows(self, kwargs: dict, rows: list[int], req) -> dict:
        """One branch's kwargs narrowed to ``rows`` (every value here is batch-first)."""
        import torch

        index = torch.tensor(rows)
        return {name: value[index.to(value.device)] for name, value in kwargs.items()}


@attrs.define(kw_only=True)
class {{ cookiecutter.class_prefix }}SamplingParams(SamplingParams):
    height: int = 256
    width: int = 256
    num_inference_steps: int = 30
    guidance_scale: float = 4.0
    max_sequence_length: int = 77
    max_sequence_length_limit: ClassVar[int] = 77  # CLIP's context length
