"""Checkpoint layouts: single-file checkpoints whose keys are a model's ORIGINAL names, not Diffusers'.

Why: the files users download for the big transformers (BFL's ``flux1-dev.safetensors``, city96's
FLUX / Wan GGUFs, ComfyUI checkpoints) keep the layout of the model's reference code: other names,
and some tensors fused (FLUX's ``qkv``) or ordered differently (FLUX's final shift/scale). A family
declares the layouts its model class reads (``ModelMixin.checkpoint_layouts``); the loader picks the
one whose marker keys the file holds and sees the file through it, as a view with Diffusers names.

Every conversion is a :class:`Piece`: rows of one source tensor, taken in order. Renaming takes all
rows, splitting a fused projection takes a range, reordering takes several. Rows are the output dim
of a weight; GGUF blocks run along the last (input) dim, so a row range of a packed tensor is a byte
range and stays packed (``gguf_io.take_rows``). The view is lazy: pass 1 of the loader reads only
names and shapes, pass 2 builds each tensor when it is assigned.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Mapping, Sequence

import attrs
import torch

log = logging.getLogger(__name__)

# Prefixes full-model checkpoints put before the denoiser's keys (ComfyUI / LDM: model.diffusion_model.).
DENOISER_PREFIXES = ("model.diffusion_model.",)

Shape = Callable[[str], tuple]


@attrs.frozen
class Piece:
    """One converted tensor: ``rows`` ranges (``(start, stop)`` along dim 0) of ``source``; ``None``: all of it."""

    source: str
    rows: tuple[tuple[int, int], ...] | None = None

    def shape(self, source_shape: tuple) -> tuple:
        if self.rows is None:
            return tuple(source_shape)
        return (sum(b - a for a, b in self.rows), *source_shape[1:])

    def make(self, t: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return t
        from .gguf_io import take_rows

        return take_rows(t, self.rows)


def split_rows(source: str, sizes: Sequence[int]) -> list[Piece]:
    """A fused projection cut into consecutive row blocks of ``sizes``."""
    pieces, start = [], 0
    for n in sizes:
        pieces.append(Piece(source, ((start, start + n),)))
        start += n
    return pieces


def swap_halves(source: str, rows: int) -> Piece:
    """The second half of the rows, then the first (e.g. ``(shift, scale)`` -> ``(scale, shift)``)."""
    half = rows // 2
    return Piece(source, ((half, rows), (0, half)))


Convert = Callable[[Sequence[str], Shape], Mapping[str, Piece]]


@attrs.frozen
class CheckpointLayout:
    """A key layout a model class can read.

    ``markers``: regexes; the layout is a file's when each one fully matches at least one key.
    ``convert(keys, shape)``: {module name: Piece}; keys it does not convert may be left out (they are
    kept under their own names, so a mismatch error names them); a file key mapped to ``None`` is known and
    unused (left out, e.g. Z-Image's ``norm_final.weight``). ``None``: the keys are the module's own.
    The layout is chosen over all shards of a checkpoint, but ``convert`` sees one file's keys at a time
    (one shard's), so it must not assume a key of another shard is there.
    """

    name: str
    markers: tuple[str, ...]
    convert: Convert | None = None

    def matches(self, keys: Sequence[str]) -> bool:
        return all(any(re.fullmatch(m, k) for k in keys) for m in self.markers)


def strip_denoiser_prefix(keys: Sequence[str]) -> dict[str, str]:
    """{key without prefix: key in the file}. A file with ``model.diffusion_model.`` keys is a full
    checkpoint: only those are the denoiser's, the rest (VAE, text encoders) are left out."""
    for prefix in DENOISER_PREFIXES:
        inner = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        if inner:
            if len(inner) < len(keys):
                log.info("using the %d keys under %r; leaving out %d others (other components of a full checkpoint)",
                         len(inner), prefix, len(keys) - len(inner))
            return inner
    return {k: k for k in keys}


def choose(layouts: Sequence[CheckpointLayout], keys: Sequence[str]) -> CheckpointLayout | None:
    """The first layout whose markers the keys hold."""
    return next((layout for layout in layouts if layout.matches(keys)), None)


def layout_names(layouts: Sequence[CheckpointLayout]) -> str:
    return ", ".join(layout.name for layout in layouts) or "Diffusers names"


@attrs.frozen
class LayoutView:
    """A weight file's keys, shapes and tensors as the chosen layout names them."""

    keys: list[str]
    shape: Shape
    tensor: Callable[[str], torch.Tensor]
    layout: CheckpointLayout | None


def view(keys: Sequence[str], shape: Shape, tensor: Callable[[str], torch.Tensor],
         layouts: Sequence[CheckpointLayout], checkpoint_keys: Sequence[str] | None = None) -> LayoutView:
    """See one file through the layout its keys match (prefix stripped); unmatched: the keys as they are.

    ``checkpoint_keys``: every shard's keys, when the file is one shard of a checkpoint; the layout is chosen
    from them, since a shard may hold none of a layout's marker keys (they sit in other shards)."""
    if not layouts:
        return LayoutView(list(keys), shape, tensor, None)
    outer = strip_denoiser_prefix(keys)
    inner = list(outer)
    layout = choose(layouts, inner if checkpoint_keys is None else list(strip_denoiser_prefix(checkpoint_keys)))
    if layout is None or layout.convert is None:
        if len(outer) == len(keys) and all(a == b for a, b in outer.items()):
            return LayoutView(list(keys), shape, tensor, layout)
        pieces = {k: Piece(k) for k in inner}
    else:
        converted = layout.convert(inner, lambda k: shape(outer[k]))
        pieces = {k: p for k, p in converted.items() if p is not None and p.source in outer}
        used = {p.source for p in pieces.values()} | {k for k, p in converted.items() if p is None}
        pieces.update({k: Piece(k) for k in inner if k not in used and k not in pieces})
    return LayoutView(list(pieces), lambda k: pieces[k].shape(shape(outer[pieces[k].source])),
                      lambda k: pieces[k].make(tensor(outer[pieces[k].source])), layout)


def identify(keys: Sequence[str], classes: Mapping[str, type]) -> dict[str, list[str]]:
    """{layout name: [class names]} for the registered model classes one of whose layouts the keys match."""
    inner = list(strip_denoiser_prefix(keys))
    found: dict[str, list[str]] = {}
    for name, cls in classes.items():
        layout = choose(getattr(cls, "checkpoint_layouts", ()), inner)
        if layout is not None:
            found.setdefault(layout.name, []).append(name)
    return found
