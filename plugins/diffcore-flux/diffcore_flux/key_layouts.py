"""FLUX.1 checkpoint layouts: Diffusers names, and BFL's original layout (``flux1-dev.safetensors``,
city96's ``flux1-dev-Q4_K_S.gguf`` and the other community GGUFs, ComfyUI checkpoints).

The original layout fuses q, k, v into one ``qkv`` per stream (double blocks) and q, k, v and the MLP
input into ``linear1`` (single blocks), and its final AdaLN projection yields ``(shift, scale)`` where
diffusers' ``norm_out.linear`` yields ``(scale, shift)``. All three are row operations (see
``diffcore.loader.key_layouts``), so GGUF tensors stay packed.
"""
from __future__ import annotations

import re

from diffcore.loader.key_layouts import CheckpointLayout, Piece, split_rows, swap_halves

TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
}
SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear",
           "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)")


def _param(suffix: str) -> str:
    return "weight" if suffix == "scale" else suffix  # the RMSNorm scales are diffusers' norm weights


def bfl_converter(top: dict, double: dict, single: dict, qkv: dict, split_linear1: bool):
    """The BFL -> Diffusers key conversion shared by FLUX.1 and FLUX.2 (their tables differ): fused ``qkv``
    split per stream, the final AdaLN halves swapped, and (FLUX.1) ``linear1`` split into q, k, v, MLP."""

    def convert(keys, shape) -> dict[str, Piece]:
        out: dict[str, Piece] = {}
        present = set(keys)
        for key in keys:
            m = _BLOCK.fullmatch(key)
            if m is None:
                stem, _, param = key.rpartition(".")
                if stem == "final_layer.adaLN_modulation.1":
                    out[f"norm_out.linear.{param}"] = swap_halves(key, shape(key)[0])
                elif stem in top:
                    out[f"{top[stem]}.{param}"] = Piece(key)
                continue
            kind, i, stem, param = m.groups()
            if kind == "double_blocks":
                prefix = f"transformer_blocks.{i}."
                if stem in qkv:
                    rows = shape(key)[0] // 3
                    for name, piece in zip(qkv[stem], split_rows(key, (rows,) * 3)):
                        out[f"{prefix}{name}.{param}"] = piece
                elif stem in double:
                    out[f"{prefix}{double[stem]}.{_param(param)}"] = Piece(key)
                continue
            prefix = f"single_transformer_blocks.{i}."
            if stem == "linear1" and split_linear1:
                linear2 = f"single_blocks.{i}.linear2.weight"
                dim = shape(linear2)[0] if linear2 in present else shape(key)[-1]  # the width; linear1's input too
                sizes = (dim, dim, dim, shape(key)[0] - 3 * dim)
                for name, piece in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), split_rows(key, sizes)):
                    out[f"{prefix}{name}.{param}"] = piece
            elif stem in single:
                out[f"{prefix}{single[stem]}.{_param(param)}"] = Piece(key)
        return out

    return convert


# BFL names -> Diffusers names (the mapping of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``,
# with the single blocks' width read from the file instead of assumed to be FLUX.1's 3072).
convert_bfl = bfl_converter(TOP, DOUBLE, SINGLE, QKV, split_linear1=True)


DIFFUSERS = CheckpointLayout("FLUX Diffusers names", (r"transformer_blocks\.\d+\.attn\.to_q\.weight",
                                                     r"single_transformer_blocks\.\d+\.proj_mlp\.weight"))
BFL = CheckpointLayout("FLUX original (BFL)", (r"double_blocks\.\d+\.img_attn\.qkv\.weight",
                                              r"single_blocks\.\d+\.linear1\.weight"), convert_bfl)
LAYOUTS = (DIFFUSERS, BFL)
