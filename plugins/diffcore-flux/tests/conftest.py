"""Tiny FLUX checkpoints built with diffusers (the oracle), saved in Diffusers format."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_flux_pipeline(kontext: bool = False, guidance_embeds: bool = True, seed: int = 0):
    """A tiny perturbed FluxPipeline / FluxKontextPipeline (diffusers objects)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffcore.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(seed)
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        eos_token_id=clip_tok.eos_token_id, bos_token_id=clip_tok.bos_token_id,
                                        pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                                 is_encoder_decoder=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.6, shift_factor=0.1,
                        use_quant_conv=False, use_post_quant_conv=False)
    for i, m in enumerate((clip, t5, transformer, vae)):
        perturb_(m, seed=seed + i)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    return cls(scheduler=scheduler, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
               transformer=transformer, vae=vae)


@pytest.fixture(scope="session")
def flux_folders(tmp_path_factory):
    """{variant: folder} for dev, schnell and kontext tiny checkpoints."""
    root = tmp_path_factory.mktemp("flux")
    out = {}
    for name, kw in {"dev": {}, "schnell": {"guidance_embeds": False}, "kontext": {"kontext": True}}.items():
        folder = root / name
        build_flux_pipeline(**kw).save_pretrained(folder)
        out[name] = folder
    return out


# ---- FLUX.2 ----------------------------------------------------------------------------------------
# A Qwen3 / Mistral-style chat template for the tiny tokenizer: [dev] passes content lists, [klein] strings.
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_flux2_tokenizer():
    from diffcore.testing.tokenizers import tiny_qwen2_tokenizer

    tok = tiny_qwen2_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_flux2_transformer(joint_attention_dim: int, guidance_embeds: bool, layers=(1, 2)):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=layers[0], num_single_layers=layers[1],
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds)


def tiny_flux2_vae(seed: int = 0):
    """Tiny AutoencoderKLFlux2 with non-trivial batch-norm statistics (else the normalisation is untested)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=32)
    g = torch.Generator().manual_seed(seed + 100)
    vae.bn.running_mean.copy_(torch.randn(16, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    return vae


def build_flux2_pipeline(kind: str = "dev", seed: int = 0):
    """A tiny perturbed FLUX.2 pipeline (diffusers objects): ``dev`` (Mistral3, guidance embedding),
    ``klein`` (distilled), ``klein-base`` (CFG) or ``klein-kv``."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                              Qwen3Config, Qwen3ForCausalLM)

    from diffcore.testing.weights import perturb_

    torch.manual_seed(seed)
    tok = tiny_flux2_tokenizer()
    if kind == "dev":  # hidden states 10, 20, 30: 31 layers at least
        te = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=MistralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=31,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      max_position_embeddings=1024),
            vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, image_size=32, patch_size=8),
            image_token_index=len(tok) - 1, spatial_merge_size=2))
    else:  # hidden states 9, 18, 27: 28 layers at least
        te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          max_position_embeddings=1024, tie_word_embeddings=True))
    transformer = tiny_flux2_transformer(48, guidance_embeds=kind == "dev")
    vae = tiny_flux2_vae(seed)
    for i, m in enumerate((te, transformer, vae)):
        perturb_(m, seed=seed + i)
    with torch.no_grad():  # sharper attention: positions (RoPE ids of references) then matter visibly
        for name, p in transformer.named_parameters():
            if ".norm_" in name:
                p.mul_(4.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="exponential")
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer)
    if kind == "dev":
        return diffusers.Flux2Pipeline(**parts)
    if kind == "klein-kv":
        return diffusers.Flux2KleinKVPipeline(**parts)
    return diffusers.Flux2KleinPipeline(**parts, is_distilled=kind == "klein")


@pytest.fixture(scope="session")
def flux2_folders(tmp_path_factory):
    """{kind: folder} of tiny FLUX.2 checkpoints saved by diffusers: dev, klein, klein-base, klein-kv."""
    root = tmp_path_factory.mktemp("flux2")
    out = {}
    for kind in ("dev", "klein", "klein-base", "klein-kv"):
        build_flux2_pipeline(kind).save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def _to_bfl(sd):
    """Diffusers -> BFL names (the inverse of diffusers' converter), to build a single file offline."""
    from diffcore_flux.flux2_key_layouts import DOUBLE, SINGLE, TOP

    inv_top = {v: k for k, v in TOP.items()}
    out = {}
    for key, t in sd.items():
        stem, _, param = key.rpartition(".")
        if stem == "norm_out.linear":
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat(t.chunk(2)[::-1])
        elif stem in inv_top:
            out[f"{inv_top[stem]}.{param}"] = t
        elif key.startswith("transformer_blocks."):
            _, i, rest = key.split(".", 2)
            name = rest.rsplit(".", 1)[0]
            for fused, parts in (("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
                                 ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))):
                if name in parts:
                    if name == parts[0]:
                        out[f"double_blocks.{i}.{fused}.weight"] = torch.cat(
                            [sd[f"transformer_blocks.{i}.{p}.weight"] for p in parts])
                    break
            else:
                bfl = {v: k for k, v in DOUBLE.items()}[name]
                out[f"double_blocks.{i}.{bfl}.{'scale' if 'norm' in bfl else 'weight'}"] = t
        elif key.startswith("single_transformer_blocks."):
            _, i, rest = key.split(".", 2)
            bfl = {v: k for k, v in SINGLE.items()}[rest.rsplit(".", 1)[0]]
            out[f"single_blocks.{i}.{bfl}.{'scale' if 'norm' in bfl else 'weight'}"] = t
    return out


@pytest.fixture(scope="session")
def flux2_to_bfl():
    """Diffusers -> BFL FLUX.2 names: builds ``flux2-*.safetensors``-style single files offline."""
    return _to_bfl


@pytest.fixture(scope="session")
def flux_fill_folder(tmp_path_factory):
    """A tiny FLUX.1-Fill-dev layout checkpoint (FluxFillPipeline)."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    from diffcore.testing.weights import perturb_

    base = build_flux_pipeline(seed=3)
    # latents (4 ch x 2x2) + masked-picture latents (16) + the 8x8-folded mask (64 x 2x2): 288 inputs, 16 outputs
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=288, out_channels=16, num_layers=1,
                                         num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=(4, 6, 6))
    perturb_(transformer, seed=11)
    folder = tmp_path_factory.mktemp("flux") / "fill"
    FluxFillPipeline(scheduler=base.scheduler, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                     text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, transformer=transformer,
                     vae=base.vae).save_pretrained(folder)
    return folder
