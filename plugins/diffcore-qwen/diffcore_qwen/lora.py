"""Qwen-Image community LoRA layouts -> diffusers layout (what diffusers' Qwen-Image LoRA loader converts).

The Qwen-Image-Lightning LoRAs and most trainers name diffusers' own modules, kohya style:
``transformer_blocks.0.attn.to_q.lora_down.weight`` / ``lora_up`` / ``alpha`` (or ``lora_A`` /
``lora_B`` with ``alpha``), optionally prefixed ``diffusion_model.``, with PEFT's ``.default`` infix,
or flattened (``lora_unet_transformer_blocks_0_attn_to_q``). A layer without ``alpha`` has scale 1.
"""
from __future__ import annotations

import re
from typing import Optional

from diffcore.lora.convert import Target, convert_layers, flat

_TOP = {"img_in": "img_in", "txt_in": "txt_in", "proj_out": "proj_out", "norm_out_linear": "norm_out.linear",
        "time_text_embed_timestep_embedder_linear_1": "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed_timestep_embedder_linear_2": "time_text_embed.timestep_embedder.linear_2"}
_BLOCK_PARTS = {
    "attn_to_q": "attn.to_q", "attn_to_k": "attn.to_k", "attn_to_v": "attn.to_v", "attn_to_out_0": "attn.to_out.0",
    "attn_add_q_proj": "attn.add_q_proj", "attn_add_k_proj": "attn.add_k_proj", "attn_add_v_proj": "attn.add_v_proj",
    "attn_to_add_out": "attn.to_add_out", "img_mod_1": "img_mod.1", "txt_mod_1": "txt_mod.1",
    "img_mlp_net_0_proj": "img_mlp.net.0.proj", "img_mlp_net_2": "img_mlp.net.2",
    "txt_mlp_net_0_proj": "txt_mlp.net.0.proj", "txt_mlp_net_2": "txt_mlp.net.2",
}
_BLOCK = re.compile(r"transformer_blocks_(\d+)_(.+)")


def _resolve(name: str) -> Optional[Target]:
    key = flat(name.replace(".default", ""))
    if key in _TOP:
        return Target((_TOP[key],))
    m = _BLOCK.fullmatch(key)
    if m is not None and m.group(2) in _BLOCK_PARTS:
        return Target((f"transformer_blocks.{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}",))
    return None


def is_qwen_community(keys) -> bool:
    """diffusers' test: alphas, ``lora_unet_`` / ``diffusion_model.`` prefixes, or PEFT's ``default.``."""
    return any(k.endswith(".alpha") or k.startswith(("lora_unet_", "diffusion_model.")) or "default." in k
               or ".lora_down." in k for k in keys)


def convert_qwen_community(state: dict) -> dict:
    return convert_layers(state, _resolve)
