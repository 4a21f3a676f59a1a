"""The original LTX-2 LoRA layout (Lightricks' trainer, e.g. the distilled LoRA, IC-LoRAs) -> diffusers layout.

Keys are ``diffusion_model.<module>.lora_A.weight`` / ``lora_B`` in LTX-2's own module names; the renames are
those of diffusers' ``_convert_non_diffusers_ltx2_lora_to_diffusers``. Text-projection (connector) layers
(``text_embedding_projection.``) are refused: diffcore applies adapters to the transformer only.
"""
from __future__ import annotations

from typing import Optional

from diffcore.lora.convert import Target, convert_layers

PREFIX = "diffusion_model."
RENAMES = (("patchify_proj", "proj_in"), ("audio_patchify_proj", "audio_proj_in"),
           ("av_ca_video_scale_shift_adaln_single", "av_cross_attn_video_scale_shift"),
           ("av_ca_a2v_gate_adaln_single", "av_cross_attn_video_a2v_gate"),
           ("av_ca_audio_scale_shift_adaln_single", "av_cross_attn_audio_scale_shift"),
           ("av_ca_v2a_gate_adaln_single", "av_cross_attn_audio_v2a_gate"),
           ("scale_shift_table_a2v_ca_video", "video_a2v_cross_attn_scale_shift_table"),
           ("scale_shift_table_a2v_ca_audio", "audio_a2v_cross_attn_scale_shift_table"),
           ("q_norm", "norm_q"), ("k_norm", "norm_k"),
           ("audio_prompt_adaln_single", "audio_prompt_adaln"), ("prompt_adaln_single", "prompt_adaln"))
TIME_EMBEDS = (("adaln_single.", "time_embed."), ("audio_adaln_single.", "audio_time_embed."))


def is_ltx2_original(keys) -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith((PREFIX, "text_embedding_projection.")) for k in keys) \
        and any(k.startswith(PREFIX) for k in keys)


def diffusers_name(name: str) -> str:
    """One module path in LTX-2's names -> diffusers' (the same replacements, in the same order)."""
    for old, new in RENAMES:
        name = name.replace(old, new)
    for old, new in TIME_EMBEDS:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _resolve(name: str) -> Optional[Target]:
    if not name.startswith(PREFIX):
        return None  # connector layers: not applied (named in the error)
    return Target((diffusers_name(name[len(PREFIX):]),))


def convert_ltx2_original(state: dict) -> dict:
    return convert_layers(state, _resolve)
