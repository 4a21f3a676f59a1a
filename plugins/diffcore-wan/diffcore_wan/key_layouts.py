"""Wan checkpoint layouts: Diffusers names, and the original Wan-Video layout (the official
``*.safetensors`` / ``*.pth`` releases, city96's ``wan2.1-t2v-14b-Q4_K_M.gguf``, Wan 2.2 GGUFs,
ComfyUI's repackaged files).

The original layout differs only in names (no fused tensors): ``self_attn``/``cross_attn`` are
``attn1``/``attn2``, the cross-attention norm is ``norm3`` there and ``norm2`` in diffusers, the
per-block ``modulation`` is ``scale_shift_table``; I2V adds ``k_img``/``v_img`` and ``img_emb``.
"""
from __future__ import annotations

import re

from diffcore.loader.key_layouts import CheckpointLayout, Piece

TOP = {
    "patch_embedding": "patch_embedding", "head.head": "proj_out",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_WHOLE = {"head.modulation": "scale_shift_table", "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}
ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj",
         "norm_q": "norm_q", "norm_k": "norm_k", "norm_k_img": "norm_added_k"}
_BLOCK = {"norm3": "norm2", "norm2": "norm3", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _block(rest: str) -> str | None:
    if rest == "modulation":
        return "scale_shift_table"
    stem, _, param = rest.rpartition(".")
    attn, _, proj = stem.partition(".")
    if attn in ("self_attn", "cross_attn") and proj in ATTN:
        return f"{'attn1' if attn == 'self_attn' else 'attn2'}.{ATTN[proj]}.{param}"
    return f"{_BLOCK[stem]}.{param}" if stem in _BLOCK else None


def convert_original(keys, shape) -> dict[str, Piece]:
    """Wan-Video names -> Diffusers names (the renames of diffusers' ``convert_wan_transformer_to_diffusers``
    for T2V / I2V / TI2V; FLF2V's ``img_emb.emb_pos`` -> ``image_embedder.pos_embed`` as well)."""
    out: dict[str, Piece] = {}
    for key in keys:
        m = _KEY.fullmatch(key)
        if m is not None:
            name = _block(m.group(2))
            if name is not None:
                out[f"blocks.{m.group(1)}.{name}"] = Piece(key)
            continue
        stem, _, param = key.rpartition(".")
        if key in _WHOLE:
            out[_WHOLE[key]] = Piece(key)
        elif stem in TOP:
            out[f"{TOP[stem]}.{param}"] = Piece(key)
    return out


DIFFUSERS = CheckpointLayout("Wan Diffusers names", (r"blocks\.\d+\.attn1\.to_q\.weight", r"condition_embedder\..+"))
ORIGINAL = CheckpointLayout("Wan original (Wan-Video)", (r"blocks\.\d+\.self_attn\.q\.weight", r"head\.head\.weight"),
                            convert_original)
LAYOUTS = (DIFFUSERS, ORIGINAL)
