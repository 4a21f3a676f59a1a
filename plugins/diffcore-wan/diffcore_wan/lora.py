"""Wan community LoRA layouts -> diffusers layout (what diffusers' Wan LoRA loader converts).

* The original Wan layout (lightx2v distill LoRAs, ComfyUI): ``diffusion_model.blocks.0.self_attn.q.
  lora_down.weight`` / ``lora_up`` / ``alpha`` (or ``lora_A`` / ``lora_B``), ``diff`` / ``diff_b`` full
  weight and bias deltas, ``head.head``, ``time_projection.1``, ``text_embedding.*``, ``time_embedding.*``,
  ``img_emb.proj.*``.
* musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight``.

``diff`` deltas of linear layers are applied (diffusers drops all but ``head.head``'s); deltas of
norms, the patch-embedding convolution and modulation tables must be all zero (they are in the
published distill LoRAs), otherwise the file is refused rather than half applied.
"""
from __future__ import annotations

import re
from typing import Optional

from diffcore.lora.convert import Target, convert_layers, flat

from .key_layouts import ATTN, TOP

# the original Wan-Video names with "_" for "."; the tables are the checkpoint layout's (key_layouts), linear layers only
_ATTN = {k: v for k, v in ATTN.items() if not k.startswith("norm")}
_GLOBAL = {k.replace(".", "_"): v for k, v in TOP.items() if k not in ("patch_embedding", "img_emb.proj.0", "img_emb.proj.4")}
_BLOCK = re.compile(r"blocks_(\d+)_(.+)")
_NO_COUNTERPART = re.compile(r"(.*norm.*|patch_embedding|.*modulation|head_modulation|img_emb_proj_[04])")


def _resolve(name: str) -> Optional[Target]:
    key = flat(name)
    if key in _GLOBAL:
        return Target((_GLOBAL[key],))
    m = _BLOCK.fullmatch(key)
    if m is not None:
        i, rest = m.groups()
        for src, attn in (("self_attn_", "attn1"), ("cross_attn_", "attn2")):
            if rest.startswith(src) and rest[len(src):] in _ATTN:
                return Target((f"blocks.{i}.{attn}.{_ATTN[rest[len(src):]]}",))
        if rest in ("ffn_0", "ffn_2"):
            return Target((f"blocks.{i}.ffn.{'net.0.proj' if rest == 'ffn_0' else 'net.2'}",))
    return Target(()) if _NO_COUNTERPART.fullmatch(key) else None


def is_wan_original(keys) -> bool:
    return any(k.startswith(("diffusion_model.", "lora_unet_blocks_")) for k in keys)


def convert_wan_original(state: dict) -> dict:
    return convert_layers(state, _resolve)
