"""Parse a LoRA in diffusers / PEFT layout into per-layer weights, with each layer's scale.

The layout (what diffusers' ``save_lora_weights`` writes; the family plugins convert community
formats into it) is, per target layer ``M`` of the transformer::

    transformer.M.lora_A.weight  (r, in)     transformer.M.lora_B.weight  (out, r)
    transformer.M.lora_B.bias    (out,)      PEFT ``lora_bias``: scaled like the product
    transformer.M.alpha          ()          optional: this layer's alpha
    transformer.M.diff           (out, in)   full weight delta (scaled by the user weight only)
    transformer.M.diff_b         (out,)      full bias delta (scaled by the user weight only)

The ``transformer.`` prefix is optional. The scale of a layer's product is ``alpha / r`` exactly as
diffusers sets up PEFT: from the file's LoraConfig metadata (``lora_alpha``, ``alpha_pattern``,
``use_rslora``) when present, else from ``.alpha`` tensors (layers without one take the most common
alpha, as diffusers' ``get_peft_kwargs`` does), else ``alpha = r`` (scale 1).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Optional

import attrs
import torch

from ..errors import LoraFormatError

TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoders.", "lora_te_", "lora_te1_", "lora_te2_",
                         "te.", "te1.", "te2.")
_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "up_bias", ".alpha": "alpha",
             ".diff": "diff", ".diff_b": "diff_b"}


@attrs.define
class LayerLora:
    """One adapter's weights for one layer: ``y += w * (scale * up(down(x)) [+ scale * up_bias] + diff x + diff_b)``."""

    down: Optional[torch.Tensor] = None  # (r, in)
    up: Optional[torch.Tensor] = None  # (out, r)
    scale: float = 1.0  # alpha / r (or alpha / sqrt(r) with rsLoRA)
    up_bias: Optional[torch.Tensor] = None  # (out,)
    diff: Optional[torch.Tensor] = None  # (out, in)
    diff_b: Optional[torch.Tensor] = None  # (out,)

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    def delta_weight(self) -> Optional[torch.Tensor]:
        """The dense weight change at user weight 1, in float32 (for fusing)."""
        delta = None
        if self.down is not None:
            delta = (self.up.float() @ self.down.float()) * self.scale
        if self.diff is not None:
            delta = self.diff.float() if delta is None else delta + self.diff.float()
        return delta

    def delta_bias(self) -> Optional[torch.Tensor]:
        delta = None
        if self.up_bias is not None:
            delta = self.up_bias.float() * self.scale
        if self.diff_b is not None:
            delta = self.diff_b.float() if delta is None else delta + self.diff_b.float()
        return delta

    def to(self, device, dtype) -> "LayerLora":
        conv = {f.name: getattr(self, f.name) for f in attrs.fields(LayerLora)}
        for k, v in conv.items():
            if isinstance(v, torch.Tensor):
                conv[k] = v.to(device=device, dtype=dtype).contiguous()
        return LayerLora(**conv)


def split_text_encoder_keys(state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """``(transformer part, text-encoder keys)``."""
    te = [k for k in state if k.startswith(TEXT_ENCODER_PREFIXES)]
    return {k: v for k, v in state.items() if k not in set(te)}, te


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha_pattern lookup (``peft.utils.other.get_pattern_key``): a regex matching the
    module name or a dotted suffix of it; a ``^`` pattern matches the whole name only."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _number(label: str, name: str, value) -> float:
    """A LoraConfig number from the file's metadata: ``lora_alpha: "eight"`` is a LoraFormatError, not a TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraFormatError(label, f"its metadata's {name} is {value!r}, not a finite number (the file's LoraConfig "
                                     "is corrupt)")
    return value


def parse_peft_layout(state: dict[str, torch.Tensor], metadata: dict, label: str) -> dict[str, LayerLora]:
    """``{module path: LayerLora}`` from a diffusers/PEFT-layout state dict (prefix ``transformer.`` optional)."""
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in state):
        raise LoraFormatError(label, "this is a DoRA adapter (dora_scale / lora_magnitude_vector keys); diffcore "
                                     "supports plain LoRA only")
    layers: dict[str, dict] = collections.defaultdict(dict)
    unknown = []
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        for suffix, field in _SUFFIXES.items():
            if name.endswith(suffix):
                layers[name[: -len(suffix)]][field] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoraFormatError(label, f"{len(unknown)} key(s) are in no LoRA layout diffcore or the model's plugin "
                                     f"knows, e.g. {', '.join(sorted(unknown)[:5])}")
    meta = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    alphas = {m: float(p["alpha"]) for m, p in layers.items() if "alpha" in p}
    common_alpha = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else None
    out = {}
    for module, parts in sorted(layers.items()):
        down, up = parts.get("down"), parts.get("up")
        if (down is None) != (up is None):
            missing = "lora_B" if up is None else "lora_A"
            raise LoraFormatError(label, f"layer {module!r} has no {missing} weight")
        if down is not None and (down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]):
            raise LoraFormatError(label, f"layer {module!r}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} "
                                         "are not a (r, in) and (out, r) pair")
        if down is None and not any(k in parts for k in ("diff", "diff_b")):
            raise LoraFormatError(label, f"layer {module!r} has only {', '.join(parts)}: no weights")
        rank = 0 if down is None else int(down.shape[0])
        scale = 1.0
        if rank:
            if "lora_alpha" in meta or "r" in meta:
                r = _number(label, "r", _pattern_value(meta.get("rank_pattern") or {}, module, meta.get("r", rank)))
                alpha = _number(label, "lora_alpha",
                                _pattern_value(meta.get("alpha_pattern") or {}, module, meta.get("lora_alpha", r)))
                if r <= 0:
                    raise LoraFormatError(label, f"its metadata gives layer {module!r} rank r={r}; a rank is a "
                                                 "positive number (the file's LoraConfig is corrupt)")
                scale = alpha / math.sqrt(r) if meta.get("use_rslora") else alpha / r
            elif common_alpha is not None:
                scale = alphas.get(module, common_alpha) / rank
        if not math.isfinite(scale):
            raise LoraFormatError(label, f"layer {module!r} has a non-finite scale (alpha / rank = {scale})")
        out[module] = LayerLora(down=down, up=up, scale=float(scale), up_bias=parts.get("up_bias"),
                                diff=parts.get("diff"), diff_b=parts.get("diff_b"))
    if not out:
        raise LoraFormatError(label, "the file holds no LoRA layers")
    return out
