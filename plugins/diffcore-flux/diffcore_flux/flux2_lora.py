"""FLUX.2 community LoRA layouts -> diffusers layout (what diffusers' ``Flux2LoraLoaderMixin`` converts).

* BFL / ai-toolkit names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, also PEFT's
  ``base_model.model.`` spelling): diffusers' ``_convert_non_diffusers_flux2_lora_to_diffusers``;
* kohya / sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``):
  ``_convert_kohya_flux2_lora_to_diffusers``.

Both name the BFL modules of ``flux2_key_layouts``: the double blocks' fused ``qkv`` is split into three
equal row blocks; the single blocks' ``linear1`` / ``linear2`` are already diffusers' fused
``to_qkv_mlp_proj`` / ``to_out``; the final layer's ``(shift, scale)`` rows become ``(scale, shift)``.
LoKr adapters (``lokr_w1`` / ``lokr_w2``, lycoris or ai-toolkit names) are refused with a clear message
(a ``LoraFormatError`` naming the adapter): diffcore applies low-rank (A, B) deltas only.
"""
from __future__ import annotations

from typing import Optional

from diffcore.lora.convert import Target, convert_layers, flat

from .flux2_key_layouts import DOUBLE, QKV, SINGLE, TOP
from .lora import resolve_bfl

_DOUBLE = {flat(k): (v,) for k, v in DOUBLE.items() if ".norm." not in k} | {flat(k): v for k, v in QKV.items()}
_SINGLE = {flat(k): (v,) for k, v in SINGLE.items() if not k.startswith("norm.")}
_GLOBAL = {flat(k): v for k, v in TOP.items()}
_PREFIXES = ("lora_unet_", "lycoris_", "diffusion_model.", "model.diffusion_model.", "base_model.model.")


def _resolve(name: str) -> Optional[Target]:
    return resolve_bfl(flat(name.removeprefix("base_model.model.")), _DOUBLE, _SINGLE, _GLOBAL)


def is_bfl(keys) -> bool:
    """BFL-named FLUX.2 LoRA keys (kohya ``lora_unet_``, ai-toolkit / ComfyUI ``diffusion_model.``, PEFT)."""
    return any(k.startswith(_PREFIXES) and ("_blocks" in k or "stream_modulation" in k) for k in keys)


def convert_bfl(state: dict) -> dict:
    if any(".lokr_" in k or "lokr_w" in k for k in state):
        raise ValueError("this FLUX.2 LoRA is a LoKr adapter (lokr_w1 / lokr_w2 keys); diffcore applies low-rank "
                        "(A, B) LoRAs only: convert it to a LoRA (e.g. with diffusers' loader, then save_lora_weights)")
    return convert_layers(state, _resolve)
