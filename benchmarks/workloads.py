"""Benchmark workloads: medium random-weight checkpoints built with diffusers (the oracle), cached on disk.

Each workload names a Diffusers pipeline class, a builder that returns the diffusers pipeline object
(weights perturbed off their trivial init so outputs depend on every weight), and the generation
arguments both engines receive. ``checkpoint(name)`` builds the folder once under benchmarks/.cache
(keyed by a hash of the builder's settings) and returns it; ``checkpoint(name, "bf16")`` returns a
bf16-stored copy of it, as the public FLUX, Qwen-Image and Wan 2.2 checkpoints are stored; Wan 2.1 ships fp32.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import attrs

CACHE = Path(__file__).resolve().parent / ".cache"
PROMPT = "a red circle on a blue background, two yellow squares"
NEGATIVE = "blurry, dark"


@attrs.frozen
class Workload:
    name: str
    pipeline: str  # diffusers pipeline class name
    settings: dict  # builder settings (hashed into the cache key)
    params: dict  # generation arguments shared by both engines (diffcore spelling)
    quick_params: dict  # overrides for --quick
    build: Callable  # settings -> diffusers pipeline
    calls_per_step: int = 1  # transformer calls per denoising step (2 with CFG)


# ------------------------------------------------------------------------------------------ FLUX
FLUX_MEDIUM = dict(
    transformer=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                     num_attention_heads=6, joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
    clip=dict(hidden=256, layers=2, heads=4, projection_dim=256),
    t5=dict(d_model=512, layers=2, heads=8),
    vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=16, norm_num_groups=32,
             scaling_factor=0.3611, shift_factor=0.1159),
    seed=0,
)


def build_flux(s: dict):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from diffcore.testing.text_encoders import tiny_clip_text_model, tiny_t5_encoder
    from diffcore.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(s["seed"])
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip = tiny_clip_text_model(clip_tok, seed=s["seed"], **s["clip"])
    t5 = tiny_t5_encoder(t5_tok, seed=s["seed"] + 1, **s["t5"])
    transformer = FluxTransformer2DModel(**s["transformer"])
    v = s["vae"]
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                        sample_size=256, **v)
    perturb_(transformer, seed=s["seed"] + 2)
    perturb_(vae, seed=s["seed"] + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer, vae=vae)


# ---------------------------------------------------------------------------------------- FLUX.2
# FLUX.2 [dev]-medium: FLUX.2's architecture (bias-free, shared modulation, fused single blocks, 4-axis RoPE,
# guidance embedding) at FLUX-medium's width; a Mistral3 text encoder 128 wide with the 31 layers the
# hidden states 10/20/30 need; AutoencoderKLFlux2 with 32 latent channels and non-trivial batch-norm stats.
FLUX2_MEDIUM = dict(
    transformer=dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=4, attention_head_dim=128,
                     num_attention_heads=6, joint_attention_dim=384, timestep_guidance_channels=256,
                     axes_dims_rope=(32, 32, 32, 32), guidance_embeds=True),
    mistral=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=31, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64),
    vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=32, norm_num_groups=32),
    seed=0,
)


def build_flux2(s: dict):
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from diffcore.testing.tokenizers import tiny_qwen2_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(s["seed"])
    tok = tiny_qwen2_tokenizer()
    tok.chat_template = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}{{ c.text }}"
                         "{% endfor %}<|im_end|>\n{% endfor %}")
    te = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(vocab_size=len(tok), max_position_embeddings=1024, **s["mistral"]),
        vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=8, image_size=32, patch_size=8),
        image_token_index=len(tok) - 1, spatial_merge_size=2))
    transformer = Flux2Transformer2DModel(**s["transformer"])
    vae = AutoencoderKLFlux2(sample_size=256, **s["vae"])
    for i, m in enumerate((te, transformer, vae)):
        perturb_(m, seed=s["seed"] + i)
    g = torch.Generator().manual_seed(s["seed"])
    n = vae.bn.running_mean.numel()
    vae.bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="exponential")
    return Flux2Pipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=te.eval(), tokenizer=tok,
                         transformer=transformer.eval())


# ------------------------------------------------------------------------------------- Qwen-Image
QWEN_MEDIUM = dict(
    transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=4, attention_head_dim=128,
                     num_attention_heads=6, joint_attention_dim=256, axes_dims_rope=(16, 56, 56)),
    text=dict(hidden=256, layers=2, heads=4, kv_heads=2),
    vae=dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    seed=0,
)
QWEN_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                      base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


def _latent_stats(n: int, seed: int) -> tuple[list, list]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.5).tolist(), (0.5 + torch.rand(n, generator=g) * 1.5).tolist()


def build_qwen(s: dict):
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    from diffcore.testing.text_encoders import tiny_qwen25vl
    from diffcore.testing.weights import perturb_
    from diffcore_qwen.testing import tiny_qwen_image_tokenizer

    torch.manual_seed(s["seed"])
    tokenizer = tiny_qwen_image_tokenizer()
    text_encoder = tiny_qwen25vl(tokenizer, seed=s["seed"], **s["text"])
    transformer = QwenImageTransformer2DModel(**s["transformer"])
    mean, std = _latent_stats(s["vae"]["z_dim"], s["seed"])
    vae = AutoencoderKLQwenImage(**s["vae"], latents_mean=mean, latents_std=std)
    perturb_(transformer, seed=s["seed"] + 1)
    perturb_(vae, seed=s["seed"] + 2)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae.eval(),
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval())


# -------------------------------------------------------------------------------------------- Wan
WAN_MEDIUM = dict(
    transformer=dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16,
                     out_channels=16, text_dim=512, freq_dim=256, ffn_dim=1536, num_layers=4, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    text=dict(d_model=512, layers=2, heads=8),
    vae=dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    flow_shift=3.0,  # = diffcore's WanConfig default, so both engines use the same schedule
    seed=0,
)


def build_wan(s: dict):
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from diffcore.testing.text_encoders import tiny_umt5_encoder
    from diffcore.testing.tokenizers import tiny_t5_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(s["seed"])
    tok = tiny_t5_tokenizer()
    text_encoder = tiny_umt5_encoder(tok, seed=s["seed"], **s["text"])
    mean, std = _latent_stats(s["vae"]["z_dim"], s["seed"])
    vae = perturb_(AutoencoderKLWan(**s["vae"], latents_mean=mean, latents_std=std), seed=s["seed"] + 1)
    transformer = perturb_(WanTransformer3DModel(**s["transformer"]), seed=s["seed"] + 2)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=s["flow_shift"], num_train_timesteps=1000)
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae.eval(), scheduler=scheduler,
                       transformer=transformer.eval())


# ------------------------------------------------------------------------------------------ LTX-2
LTX_MEDIUM = dict(
    transformer=dict(in_channels=64, out_channels=64, num_attention_heads=8, attention_head_dim=64,
                     cross_attention_dim=512, audio_in_channels=128, audio_out_channels=128,
                     audio_num_attention_heads=4, audio_attention_head_dim=64, audio_cross_attention_dim=256,
                     num_layers=4, caption_channels=256, rope_type="split"),  # LTX-2.0 switches (no perturbed_attn)
    connectors=dict(caption_channels=256, text_proj_in_factor=5, video_connector_num_attention_heads=2,
                    video_connector_attention_head_dim=128, video_connector_num_layers=2,
                    video_connector_num_learnable_registers=32, audio_connector_num_attention_heads=2,
                    audio_connector_attention_head_dim=128, audio_connector_num_layers=2,
                    audio_connector_num_learnable_registers=32, rope_type="split"),
    text=dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=512),
    vae=dict(latent_channels=64, block_out_channels=(64, 64, 128, 128), decoder_block_out_channels=(64, 128, 256),
             layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), spatial_compression_ratio=32,
             temporal_compression_ratio=8),
    audio_vae=dict(base_channels=128, ch_mult=(1, 2, 4), num_res_blocks=1, latent_channels=8, mel_bins=64),
    vocoder=dict(in_channels=128, hidden_channels=256, out_channels=2, upsample_kernel_sizes=[16, 15, 8, 4, 4],
                 upsample_factors=[6, 5, 2, 2, 2], resnet_kernel_sizes=[3, 7], resnet_dilations=[[1, 3], [1, 3]],
                 output_sampling_rate=24000),
    seed=0,
)


def build_ltx(s: dict):
    import torch
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2Pipeline, LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    from diffcore.testing.gemma import tiny_gemma3, tiny_gemma_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(s["seed"])
    tok = tiny_gemma_tokenizer()
    vae = perturb_(AutoencoderKLLTX2Video(**s["vae"]), seed=s["seed"] + 1)
    audio_vae = perturb_(AutoencoderKLLTX2Audio(**s["audio_vae"]), seed=s["seed"] + 2)
    for module in (vae, audio_vae):  # the latent statistics are buffers that start as a no-op
        mean, std = _latent_stats(module.latents_mean.numel(), s["seed"])
        module.latents_mean.copy_(torch.tensor(mean)), module.latents_std.copy_(torch.tensor(std))
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                  base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1),
        vae=vae.eval(), audio_vae=audio_vae.eval(), text_encoder=tiny_gemma3(len(tok), s["seed"] + 3, **s["text"]),
        tokenizer=tok, connectors=perturb_(LTX2TextConnectors(**s["connectors"]), seed=s["seed"] + 4).eval(),
        transformer=perturb_(LTX2VideoTransformer3DModel(**s["transformer"]), seed=s["seed"] + 5).eval(),
        vocoder=perturb_(LTX2Vocoder(**s["vocoder"]), seed=s["seed"] + 6).eval())


# --------------------------------------------------------------------------------------- Z-Image
ZIMAGE_MEDIUM = dict(
    transformer=dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=768, n_layers=4, n_refiner_layers=2,
                     n_heads=6, n_kv_heads=6, cap_feat_dim=256, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
    text=dict(hidden=256, layers=3, heads=4, kv_heads=2, head_dim=64),
    vae=FLUX_MEDIUM["vae"],
    seed=0,
)


def build_zimage(s: dict):
    """Z-Image-Turbo's architecture at medium size (8 transformer blocks of 768, 63M parameters), built with
    diffusers; the Qwen3 text encoder and tokenizer are the plugin's tiny offline ones at 256 wide."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from diffcore.testing.weights import perturb_
    from diffcore_zimage.testing import tiny_qwen3, tiny_qwen3_tokenizer

    torch.manual_seed(s["seed"])
    tokenizer = tiny_qwen3_tokenizer()
    text_encoder = tiny_qwen3(tokenizer, seed=s["seed"], **s["text"])
    transformer = ZImageTransformer2DModel(**s["transformer"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                        sample_size=256, **s["vae"])
    perturb_(transformer, seed=s["seed"] + 2)
    perturb_(vae, seed=s["seed"] + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


WORKLOADS: dict[str, Workload] = {
    "flux": Workload(
        name="flux", pipeline="FluxPipeline", settings=FLUX_MEDIUM, build=build_flux,
        params=dict(prompt=PROMPT, height=256, width=256, num_inference_steps=28, guidance_scale=3.5,
                    max_sequence_length=256),
        quick_params=dict(num_inference_steps=6),
    ),
    "flux2": Workload(
        name="flux2", pipeline="Flux2Pipeline", settings=FLUX2_MEDIUM, build=build_flux2,
        params=dict(prompt=PROMPT, height=256, width=256, num_inference_steps=12, guidance_scale=4.0,
                    max_sequence_length=256),
        quick_params=dict(num_inference_steps=4),
    ),
    "qwen": Workload(
        name="qwen", pipeline="QwenImagePipeline", settings=QWEN_MEDIUM, build=build_qwen, calls_per_step=2,
        params=dict(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=256, width=256,
                    num_inference_steps=10, max_sequence_length=128),
        quick_params=dict(num_inference_steps=4),
    ),
    "wan": Workload(
        name="wan", pipeline="WanPipeline", settings=WAN_MEDIUM, build=build_wan, calls_per_step=2,
        params=dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, height=256, width=256, num_frames=33,
                    num_inference_steps=10),
        quick_params=dict(num_inference_steps=3, num_frames=9),
    ),
    # the dev defaults: CFG on [negative, positive] in one call, STG and modality isolation: 3 calls per step
    "ltx": Workload(
        name="ltx", pipeline="LTX2Pipeline", settings=LTX_MEDIUM, build=build_ltx, calls_per_step=3,
        params=dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=256, width=384, num_frames=25, frame_rate=24.0,
                    num_inference_steps=10, max_sequence_length=128, spatio_temporal_guidance_blocks=[1]),
        quick_params=dict(num_inference_steps=3, num_frames=9),
    ),
    "zimage": Workload(  # Z-Image-Turbo's recipe: 8 steps, guidance 0 (no CFG) at 256x256
        name="zimage", pipeline="ZImagePipeline", settings=ZIMAGE_MEDIUM, build=build_zimage,
        params=dict(prompt=PROMPT, height=256, width=256, num_inference_steps=8, guidance_scale=0.0),
        quick_params=dict(num_inference_steps=2),
    ),
}


def register(workload: Workload) -> None:
    WORKLOADS[workload.name] = workload


# LTX-2 without STG: both engines then make the same 2 calls per step (diffcore skips the STG call of a transformer
# without perturbed attention, a zero term diffusers computes anyway), so this row measures engine speed alone.
register(attrs.evolve(WORKLOADS["ltx"], name="ltx-nostg", calls_per_step=2,
                      params={**WORKLOADS["ltx"].params, "stg_scale": 0.0, "audio_stg_scale": 0.0}))


def _key(w: Workload) -> str:
    blob = json.dumps({"pipeline": w.pipeline, "settings": w.settings}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint(name: str, dtype: str = "fp32", log=print) -> Path:
    """The cached Diffusers folder of workload ``name``: built with diffusers (fp32) on first use;
    ``dtype="bf16"``: a copy next to it with every floating-point weight stored in bf16."""
    w = WORKLOADS[name]
    folder = CACHE / f"{name}-{_key(w)}"
    if dtype != "fp32":
        src, folder = checkpoint(name, log=log), folder.with_name(f"{folder.name}-{dtype}")
    if (folder / "model_index.json").is_file():
        return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log(f"building {name} {dtype} checkpoint in {folder} ...")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if dtype == "fp32":
        w.build(w.settings).save_pretrained(tmp)
    else:
        cast_copy(src, tmp, dtype)
    tmp.rename(folder)
    return folder


def _cast(t, dtype):
    return t.to(dtype) if t.is_floating_point() else t


def cast_copy(src: Path, dst: Path, dtype: str) -> None:
    """Copy a Diffusers folder file by file, storing every floating-point tensor of its *.safetensors in
    ``dtype`` (metadata and other tensors kept) and updating ``total_size`` of sharded indexes; other
    files are copied unchanged. Not diffusers' save_pretrained: only the weights' dtype may differ."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = {"bf16": torch.bfloat16}[dtype]
    nbytes: dict[Path, int] = {}
    indexes = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                tensors = {k: _cast(f.get_tensor(k), dtype) for k in f.keys()}
                save_file(tensors, out, metadata=f.metadata())
            nbytes[out] = sum(t.nbytes for t in tensors.values())
        else:
            shutil.copy2(path, out)
            if path.name.endswith(".safetensors.index.json"):
                indexes.append(out)
    for out in indexes:  # the weight map is unchanged (same names, same files); only the byte count is not
        index = json.loads(out.read_text())
        shards = {out.parent / f for f in index["weight_map"].values()}
        index.setdefault("metadata", {})["total_size"] = sum(nbytes[f] for f in shards)
        out.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
