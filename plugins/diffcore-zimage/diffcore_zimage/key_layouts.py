"""Z-Image checkpoint layouts: Diffusers names, and the original one (Tongyi-MAI's code, ComfyUI's
``z_image_turbo_bf16.safetensors``, unsloth's GGUFs), which fuses q, k, v into ``attention.qkv`` and names
the output ``attention.out``, the QK norms ``q_norm`` / ``k_norm`` and the patch embedder / final layer
without the ``2-1`` patch-size key. Same mapping as diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``;
the qkv split is a row operation, so GGUF tensors stay packed.
"""
from __future__ import annotations

from typing import Optional

from diffcore.loader.key_layouts import CheckpointLayout, Piece, split_rows

RENAMES = (("final_layer.", "all_final_layer.2-1."), ("x_embedder.", "all_x_embedder.2-1."),
           (".attention.out.", ".attention.to_out.0."), (".attention.k_norm.", ".attention.norm_k."),
           (".attention.q_norm.", ".attention.norm_q."))
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def convert_original(keys, shape) -> dict[str, Optional[Piece]]:
    out: dict[str, Piece] = {}
    for key in keys:
        name = key
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name == "norm_final.weight":  # unused by the model (diffusers drops it too)
            out[key] = None
            continue
        for old, new in RENAMES:
            name = name.replace(old, new)
        if ".attention.qkv." in name:
            rows = shape(key)[0] // 3
            for proj, piece in zip(("to_q", "to_k", "to_v"), split_rows(key, (rows,) * 3)):
                out[name.replace(".attention.qkv.", f".attention.{proj}.")] = piece
        else:
            out[name] = Piece(key)
    return out


DIFFUSERS_LAYOUT = CheckpointLayout("Z-Image Diffusers names", (r"layers\.\d+\.attention\.to_q\.weight",
                                                                r"all_x_embedder\.2-1\.weight"))
ORIGINAL_LAYOUT = CheckpointLayout("Z-Image original (Tongyi-MAI / ComfyUI)",
                                   (r"(model\.diffusion_model\.)?layers\.\d+\.attention\.qkv\.weight",
                                    r"(model\.diffusion_model\.)?layers\.0\.adaLN_modulation\.0\.weight"),
                                   convert_original)
LAYOUTS = (DIFFUSERS_LAYOUT, ORIGINAL_LAYOUT)
