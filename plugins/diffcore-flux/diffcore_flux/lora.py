"""FLUX.1 community LoRA layouts -> diffusers layout (what diffusers' Flux LoRA loader converts).

* kohya / sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up`` /
  ``alpha`` (and ``diff`` / ``diff_b`` full deltas), named after the original BFL modules; also the
  ComfyUI spelling ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``.
* XLabs: ``double_blocks.0.processor.qkv_lora1.down.weight`` (no alpha: scale 1).

Fused projections split into diffusers' modules: ``qkv`` -> ``to_q/to_k/to_v`` (equal thirds), a
single block's ``linear1`` -> ``to_q/to_k/to_v/proj_mlp`` (D, D, D, 4D, with D = rows / 7, so any
model size works), and the final layer's ``(shift, scale)`` rows become diffusers' ``(scale, shift)``.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from diffcore.lora.convert import Target, convert_layers, flat

from .key_layouts import DOUBLE, QKV, SINGLE, TOP

# kohya names are BFL's original names with "_" for "."; the tables are the checkpoint layout's (key_layouts)
_DOUBLE = {k.replace(".", "_"): (v,) for k, v in DOUBLE.items() if ".norm." not in k} | {
    k.replace(".", "_"): v for k, v in QKV.items()}
_SINGLE = {k.replace(".", "_"): (v,) for k, v in SINGLE.items() if not k.startswith("norm.")}
_GLOBAL = {k.replace(".", "_"): v for k, v in TOP.items()}
_BLOCK = re.compile(r"(double|single)_blocks_(\d+)_(.+)")


def swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    """BFL's final adaLN emits (shift, scale); diffusers' norm_out.linear (scale, shift)."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _single_linear1(rows: int) -> tuple[int, ...]:
    d = rows // 7
    return (d, d, d, 4 * d)


def resolve_bfl(key: str, double: dict, single: dict, globals_: dict, sizes=None) -> Optional[Target]:
    """The diffusers module(s) of a flattened BFL layer name (FLUX.1 and FLUX.2 tables differ); ``sizes(rest)``
    optionally gives the row split of a fused single-block layer (FLUX.1's ``linear1``)."""
    if key == "final_layer_adaLN_modulation_1":
        return Target(("norm_out.linear",), rows=swap_scale_shift)
    if key in globals_:
        return Target((globals_[key],))
    m = _BLOCK.fullmatch(key)
    if m is None:
        return None
    kind, i, rest = m.groups()
    table, prefix = (double, "transformer_blocks") if kind == "double" else (single, "single_transformer_blocks")
    mods = table.get(rest)
    if mods is None:
        return Target(()) if "norm" in rest else None
    split = sizes(rest) if sizes is not None and kind == "single" else None
    return Target(tuple(f"{prefix}.{i}.{p}" for p in mods), sizes=split)


def _resolve_kohya(name: str, state_rows: dict) -> Optional[Target]:
    def sizes(rest):
        return _single_linear1(state_rows[name]) if rest == "linear1" else None

    return resolve_bfl(flat(name), _DOUBLE, _SINGLE | {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
                       _GLOBAL, sizes)


def _rows(state: dict) -> dict:
    from diffcore.lora.convert import group_layers

    groups, _ = group_layers(state)
    rows = {}
    for name, parts in groups.items():
        t = next((parts[p] for p in ("up", "diff", "diff_b") if p in parts), None)
        rows[name] = 0 if t is None else t.shape[0]
    return rows


def is_kohya(keys) -> bool:
    return not is_xlabs(keys) and any(k.startswith("lora_unet_") or (k.startswith(("diffusion_model.", "model.diffusion_model."))
                                             and "_blocks." in k) for k in keys)


def convert_kohya(state: dict) -> dict:
    state = {k: v for k, v in state.items() if "position_embedding" not in k or bool(v.any())}
    rows = _rows(state)
    return convert_layers(state, lambda name: _resolve_kohya(name, rows))


_XLABS = re.compile(r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)")


def _resolve_xlabs(name: str) -> Optional[Target]:
    m = _XLABS.fullmatch(name)
    if m is None:
        return None
    kind, i, proj, stream = m.groups()
    if kind == "single":
        base = f"single_transformer_blocks.{i}."
        return Target((base + "proj_out",)) if proj == "proj" else Target(tuple(base + f"attn.to_{c}" for c in "qkv"))
    base = f"transformer_blocks.{i}.attn."
    if proj == "proj":
        return Target((base + ("to_out.0" if stream == "1" else "to_add_out"),))
    names = ("to_q", "to_k", "to_v") if stream == "1" else ("add_q_proj", "add_k_proj", "add_v_proj")
    return Target(tuple(base + n for n in names))


def is_xlabs(keys) -> bool:
    return any(".processor." in k and "_lora" in k for k in keys)


def convert_xlabs(state: dict) -> dict:
    return convert_layers(state, _resolve_xlabs)
