"""Tiny LTX-2 pipelines built with diffusers' own classes (the oracle), perturbed so every weight matters.

Traps handled (see shared NOTES "Newer families offline"): the video VAE's compression ratios are set
explicitly (32 / 8), the audio VAE's base_channels is 128 (its latent statistics are sized by it), both VAEs'
latent statistics are set off their no-op values, the vocoder's weights are scaled up so the sound depends on
the prompt, the transformer has perturbed attention (so STG changes the result) and 2 blocks (STG on block 0).
"""
from __future__ import annotations

import torch

SMALL = dict(height=64, width=96, num_frames=9, frame_rate=24.0, num_inference_steps=2, max_sequence_length=32,
             spatio_temporal_guidance_blocks=[0])
VIDEO_VAE = dict(latent_channels=8, block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 16, 32),
                 layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), spatial_compression_ratio=32,
                 temporal_compression_ratio=8)
AUDIO_VAE = dict(base_channels=128, ch_mult=(1, 1, 1), num_res_blocks=1, latent_channels=8, mel_bins=64)
VOCODER = dict(in_channels=128, hidden_channels=64, out_channels=2, upsample_kernel_sizes=[16, 15, 8, 4, 4],
               upsample_factors=[6, 5, 2, 2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3]],
               output_sampling_rate=24000)
CONNECTORS = dict(caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                  video_connector_attention_head_dim=8, video_connector_num_layers=1,
                  video_connector_num_learnable_registers=8, audio_connector_num_attention_heads=2,
                  audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
                  audio_connector_num_learnable_registers=8, rope_type="split")
TRANSFORMER = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                   audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=2,
                   audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16,
                   rope_type="split", perturbed_attn=True)
# LTX-2.3's deltas (models-2026 1.6, 5.2): gated attention, cross-attention modulation, no caption projection (the
# connectors project per modality to the DiT's widths), perturbed attention, 8-layer gated connectors, zero-padded
# decoder, and the 48 kHz vocoder with bandwidth extension (16 kHz stage, 48 kHz extender; narrow, shallow stacks).
TRANSFORMER_23 = dict(TRANSFORMER, gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
                      use_prompt_embeddings=False)
CONNECTORS_23 = dict(CONNECTORS, per_modality_projections=True, video_hidden_dim=32, audio_hidden_dim=16, proj_bias=True,
                     video_gated_attn=True, audio_gated_attn=True, video_connector_attention_head_dim=16,
                     video_connector_num_layers=2,
                     audio_connector_num_layers=2)
VIDEO_VAE_23 = dict(VIDEO_VAE, block_out_channels=(8, 16, 16, 16), decoder_block_out_channels=(8, 16, 32),
                    decoder_spatial_padding_mode="zeros")
VOCODER_23 = dict(in_channels=128, hidden_channels=128, out_channels=2, upsample_kernel_sizes=[11, 4, 4, 4, 4, 4],
                  upsample_factors=[5, 2, 2, 2, 2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3]],
                  bwe_hidden_channels=64, bwe_upsample_kernel_sizes=[12, 11, 4, 4, 4],
                  bwe_upsample_factors=[6, 5, 2, 2, 2], bwe_resnet_kernel_sizes=[3], bwe_resnet_dilations=[[1]],
                  filter_length=64, hop_length=80, window_length=64, num_mel_channels=64)
SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                 max_image_seq_len=4096, shift_terminal=0.1)


def fill_bwe_buffers_(vocoder, seed: int = 0):
    """Give the BWE vocoder's STFT basis and mel filterbank real values (diffusers initialises them to zeros and
    reads them from the checkpoint): a Hann-windowed DFT and a random non-negative filterbank."""
    stft = vocoder.mel_stft.stft_fn
    n = stft.forward_basis.shape[-1]
    freqs = torch.arange(n // 2 + 1, dtype=torch.float64)[:, None]
    phase = 2 * torch.pi * freqs * torch.arange(n, dtype=torch.float64)[None] / n
    window = torch.hann_window(n, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(phase), -torch.sin(phase)]) * window
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        stft.forward_basis.copy_(basis[:, None].float())
        stft.inverse_basis.copy_(basis[:, None].float())
        vocoder.mel_stft.mel_basis.copy_(torch.rand(vocoder.mel_stft.mel_basis.shape, generator=g) * 0.2)
    return vocoder


def diffusers_pipeline(image_to_video: bool = False, seed: int = 0, perturbed_attn: bool = True,
                       version: str = "2.0"):
    """The tiny LTX2Pipeline (or LTX2ImageToVideoPipeline) with perturbed random weights, LTX-2.0 or 2.3 shaped."""
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2ImageToVideoPipeline, LTX2Pipeline, LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    from diffcore.testing.gemma import tiny_gemma3, tiny_gemma_tokenizer
    from diffcore.testing.weights import perturb_

    torch.manual_seed(seed)
    tokenizer = tiny_gemma_tokenizer()
    v23 = version == "2.3"
    vae = perturb_(AutoencoderKLLTX2Video(**(VIDEO_VAE_23 if v23 else VIDEO_VAE)).eval(), seed=seed + 1)
    audio_vae = perturb_(AutoencoderKLLTX2Audio(**AUDIO_VAE).eval(), seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    for module, n in ((vae, VIDEO_VAE["latent_channels"]), (audio_vae, 128)):
        module.latents_mean.copy_(torch.randn(n, generator=g) * 0.3)
        module.latents_std.copy_(torch.rand(n, generator=g) + 0.5)
    vocoder = (fill_bwe_buffers_(LTX2VocoderWithBWE(**VOCODER_23), seed) if v23 else LTX2Vocoder(**VOCODER)).eval()
    with torch.no_grad():  # default-gain weights give a near-silent, prompt-independent waveform
        for p in vocoder.parameters():
            p.mul_(1.5)
    perturb_(vocoder, seed=seed + 4)
    transformer = perturb_(LTX2VideoTransformer3DModel(**{**(TRANSFORMER_23 if v23 else TRANSFORMER),
                                                            "perturbed_attn": perturbed_attn}).eval(), seed=seed + 5)
    connectors = perturb_(LTX2TextConnectors(**(CONNECTORS_23 if v23 else CONNECTORS)).eval(), seed=seed + 6)
    cls = LTX2ImageToVideoPipeline if image_to_video else LTX2Pipeline
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, audio_vae=audio_vae,
               text_encoder=tiny_gemma3(len(tokenizer), seed + 7), tokenizer=tokenizer, connectors=connectors,
               transformer=transformer, vocoder=vocoder)


def write_checkpoint(folder, image_to_video: bool = False, **kw):
    pipe = diffusers_pipeline(image_to_video, **kw)
    pipe.save_pretrained(folder)
    return folder


def run_diffusers(folder, image_to_video: bool = False, seed: int = 0, **kwargs):
    """diffusers' pipeline from the saved folder: (frames (B, F, H, W, 3) in [0, 1], waveform (B, C, S))."""
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

    cls = LTX2ImageToVideoPipeline if image_to_video else LTX2Pipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    args = {**SMALL, **kwargs}
    frames, audio = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", return_dict=False, **args)
    return frames, audio.float().numpy()
