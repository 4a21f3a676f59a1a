"""Helpers for the plugins' community-format converters (kohya / sd-scripts, ComfyUI, XLabs, musubi).

Those files name each source layer once (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``,
``.diff``, ``.diff_b``), often for a projection the diffusers model splits in several (FLUX's fused
``qkv``). A plugin supplies only ``resolve(name)``: the diffusers module path(s) a source layer becomes;
``convert_layers`` does the rest and returns the diffusers / PEFT layout ``diffcore.lora.adapter``
reads, with an explicit ``.alpha`` per layer (a layer without one has alpha = rank, i.e. scale 1,
as in diffusers' converters).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import attrs
import torch

from .adapter import TEXT_ENCODER_PREFIXES

_PARTS = {".lora_down.weight": "down", ".lora_A.weight": "down", ".down.weight": "down",
          ".lora_up.weight": "up", ".lora_B.weight": "up", ".up.weight": "up", ".lora_B.bias": "up_bias",
          ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b"}


@attrs.frozen
class Target:
    """Where one source layer goes: ``modules`` (several: its output rows are split by ``sizes``, equal
    parts by default); ``rows`` optionally reorders output rows (FLUX's final scale/shift swap).
    An empty ``modules`` means "no counterpart": accepted only when every tensor is zero."""

    modules: tuple[str, ...]
    sizes: Optional[tuple[int, ...]] = None
    rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def group_layers(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """``({source layer: {part: tensor}}, keys in no known part)``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        for suffix, part in _PARTS.items():
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            unknown.append(key)
    return groups, unknown


def _split(t: Optional[torch.Tensor], sizes: Sequence[int], rows) -> list:
    if t is None:
        return [None] * len(sizes)
    if rows is not None:
        t = rows(t)
    return list(t.split(list(sizes), dim=0))


def emit(out: dict, target: Target, parts: dict[str, torch.Tensor], prefix: str = "transformer.") -> None:
    down, up = parts.get("down"), parts.get("up")
    if (down is None) != (up is None):
        raise ValueError(f"a layer has {'lora_down' if down is not None else 'lora_up'} without its pair")
    rows_total = next((t.shape[0] for t in (up, parts.get("diff"), parts.get("diff_b"), parts.get("up_bias"))
                       if t is not None), 0)
    n = len(target.modules)
    sizes = target.sizes or (rows_total // n,) * n
    if sum(sizes) != rows_total:
        raise ValueError(f"cannot split {rows_total} output rows into {list(sizes)} for {', '.join(target.modules)}")
    ups = _split(up, sizes, target.rows)
    fields = {p: _split(parts.get(p), sizes, target.rows) for p in ("diff", "diff_b", "up_bias")}
    alpha = None
    if down is not None:
        alpha = parts["alpha"].float().reshape(()) if "alpha" in parts else torch.tensor(float(down.shape[0]))
    for i, module in enumerate(target.modules):
        key = prefix + module
        if down is not None:
            out[f"{key}.lora_A.weight"] = down
            out[f"{key}.lora_B.weight"] = ups[i].contiguous()
            out[f"{key}.alpha"] = alpha
        for part, suffix in (("diff", ".diff"), ("diff_b", ".diff_b"), ("up_bias", ".lora_B.bias")):
            if fields[part][i] is not None:
                out[key + suffix] = fields[part][i].contiguous()


def convert_layers(state: dict[str, torch.Tensor], resolve: Callable[[str], Optional[Target]],
                   prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """Convert every source layer through ``resolve``; text-encoder keys pass through unchanged (the core
    refuses or skips them); a layer ``resolve`` does not know raises ``ValueError`` naming a few."""
    te = {k: v for k, v in state.items() if k.startswith(TEXT_ENCODER_PREFIXES)}
    groups, unknown = group_layers({k: v for k, v in state.items() if k not in te})
    out: dict[str, torch.Tensor] = dict(te)
    unresolved, nonzero = [], []
    for name, parts in groups.items():
        target = resolve(name)
        if target is None:
            unresolved.append(name)
        elif not target.modules:
            if any(bool(t.any()) for p, t in parts.items() if p != "alpha"):
                nonzero.append(name)
        else:
            emit(out, target, parts, prefix)
    if unknown or unresolved:
        names = sorted(unknown + unresolved)
        raise ValueError(f"{len(names)} key(s)/layer(s) have no counterpart in the model: {', '.join(names[:5])}")
    if nonzero:
        raise ValueError(f"non-zero deltas for layers diffcore cannot change (norms, convolutions): "
                         f"{', '.join(sorted(nonzero)[:5])}")
    return out


def flat(name: str) -> str:
    """kohya / ComfyUI module names: ``diffusion_model.a.b.0`` -> ``a_b_0`` (prefixes dropped)."""
    for p in ("model.diffusion_model.", "diffusion_model.", "lora_unet_", "transformer."):
        name = name.removeprefix(p)
    return name.replace(".", "_")
