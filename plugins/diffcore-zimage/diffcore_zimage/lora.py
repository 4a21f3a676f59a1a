"""Z-Image community LoRA layouts -> diffusers layout (what diffusers' ``ZImageLoraLoaderMixin`` converts).

* kohya / sd-scripts: ``lora_unet_layers_0_attention_to_q.lora_down.weight`` / ``lora_up`` / ``alpha``, also
  over the original module tree (``..._attention_qkv``, ``..._attention_out``);
* ComfyUI / ai-toolkit / musubi: ``diffusion_model.layers.0.attention.to_q.lora_A.weight`` (or
  ``lora_down``), with ``.alpha``; PEFT adapter names (``.lora_A.default.weight``);
* the dot spelling some trainers use: ``layers.0.attention.to.q.lora.down.weight``.

Fused ``qkv`` splits into ``to_q / to_k / to_v`` (equal thirds); next to split keys it is redundant and
dropped, as diffusers does. Plain diffusers / PEFT files (``transformer.*.lora_A/B``) need no converter.
"""
from __future__ import annotations

import re
from typing import Optional

from diffcore.lora.convert import Target, convert_layers, flat

_IN_BLOCK = {
    "attention_to_q": ("attention.to_q",), "attention_to_k": ("attention.to_k",),
    "attention_to_v": ("attention.to_v",), "attention_to_out_0": ("attention.to_out.0",),
    "attention_out": ("attention.to_out.0",), "attention_qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "feed_forward_w1": ("feed_forward.w1",), "feed_forward_w2": ("feed_forward.w2",),
    "feed_forward_w3": ("feed_forward.w3",), "adaLN_modulation_0": ("adaLN_modulation.0",),
}
_GLOBAL = {
    "all_x_embedder_2-1": "all_x_embedder.2-1", "x_embedder": "all_x_embedder.2-1",
    "all_final_layer_2-1_linear": "all_final_layer.2-1.linear", "final_layer_linear": "all_final_layer.2-1.linear",
    "all_final_layer_2-1_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "cap_embedder_1": "cap_embedder.1", "t_embedder_mlp_0": "t_embedder.mlp.0", "t_embedder_mlp_2": "t_embedder.mlp.2",
}
_BLOCK = re.compile(r"(layers|noise_refiner|context_refiner)_(\d+)_(.+)")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "lora_unet_")


def _resolve(name: str) -> Optional[Target]:
    key = flat(name)
    if key in _GLOBAL:
        return Target((_GLOBAL[key],))
    m = _BLOCK.fullmatch(key)
    if m is None:
        return None
    kind, i, rest = m.groups()
    mods = _IN_BLOCK.get(rest)
    if mods is None:
        return Target(()) if "norm" in rest else None
    return Target(tuple(f"{kind}.{i}.{p}" for p in mods))


def _normalise(state: dict) -> dict:
    """One spelling for the parts (``.lora.down`` -> ``.lora_down``, PEFT ``.default`` dropped); a fused
    ``qkv`` (or bare ``out``) next to the split layers it duplicates is dropped."""
    out = {}
    for key, value in state.items():
        key = key.replace(".lora.down.weight", ".lora_down.weight").replace(".lora.up.weight", ".lora_up.weight")
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        out[key] = value
    layers = {flat(k.rsplit(".lora", 1)[0].removesuffix(".alpha")) for k in out}
    for key in list(out):
        base = flat(key.rsplit(".lora", 1)[0].removesuffix(".alpha"))
        if base.endswith("_attention_qkv") and base.removesuffix("qkv") + "to_q" in layers:
            del out[key]
        elif base.endswith("_attention_out") and base.removesuffix("out") + "to_out_0" in layers:
            del out[key]
    return out


def is_community(keys) -> bool:
    keys = list(keys)
    return any(k.startswith(_PREFIXES) or ".lora_down." in k or ".lora.down." in k or ".default." in k
               or k.endswith(".alpha") for k in keys) and any("layers" in k or "refiner" in k for k in keys)


def convert(state: dict) -> dict:
    return convert_layers(_normalise(state), _resolve)
