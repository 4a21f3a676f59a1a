"""FLUX.2 checkpoint layouts: Diffusers names, and BFL's original layout (``flux2-dev.safetensors``,
``flux-2-klein-*.safetensors``, city96 / orabazes GGUFs, ComfyUI files with ``model.diffusion_model.``).

The mapping is diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``: the double blocks'
fused ``qkv`` per stream is split into q, k, v; the single blocks' ``linear1`` / ``linear2`` are
already diffusers' fused ``to_qkv_mlp_proj`` / ``to_out``; the final AdaLN projection's halves are
swapped (BFL ``(shift, scale)``, diffusers ``(scale, shift)``). All are row operations, so GGUF tensors
stay packed (see ``diffcore.loader.key_layouts``).
"""
from __future__ import annotations

from diffcore.loader.key_layouts import CheckpointLayout

from .key_layouts import bfl_converter

TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
}
DOUBLE = {
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
}
SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out",
          "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
# BFL FLUX.2 names -> Diffusers names (diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``)
convert_bfl = bfl_converter(TOP, DOUBLE, SINGLE, QKV, split_linear1=False)


DIFFUSERS = CheckpointLayout("FLUX.2 Diffusers names", (r"single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj\.weight",
                                                       r"double_stream_modulation_img\.linear\.weight"))
BFL = CheckpointLayout("FLUX.2 original (BFL)", (r"double_blocks\.\d+\.img_attn\.qkv\.weight",
                                                r"single_stream_modulation\.lin\.weight"), convert_bfl)
LAYOUTS = (DIFFUSERS, BFL)
