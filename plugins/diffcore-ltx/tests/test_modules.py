"""Each LTX-2 model class against its diffusers original: same parameter names (strict load), same outputs."""
from __future__ import annotations

import pytest
import torch

from diffcore.testing.weights import perturb_

from ltx_testlib import AUDIO_VAE, CONNECTORS, TRANSFORMER, VIDEO_VAE, VIDEO_VAE_23, VOCODER, VOCODER_23, fill_bwe_buffers_

ATOL = 2e-5


def _pair(ref_cls, mine_cls, config, seed=3):
    torch.manual_seed(seed)
    ref = perturb_(ref_cls(**config).eval(), seed=seed)
    mine = mine_cls.from_config(config).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)  # every name and shape equal, nothing left over
    return ref, mine


def _close(a, b):
    assert a.shape == b.shape
    assert (a.float() - b.float()).abs().max().item() <= ATOL


GATED = dict(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
             use_prompt_embeddings=False, rope_type="interleaved")  # the LTX-2.3 switches


@pytest.mark.parametrize("extra", [{}, GATED], ids=["ltx2.0", "ltx2.3-switches"])
def test_transformer_matches_diffusers(extra):
    from diffusers import LTX2VideoTransformer3DModel as Ref

    from diffcore_ltx.transformer import LTX2VideoTransformer3DModel

    ref, mine = _pair(Ref, LTX2VideoTransformer3DModel, {**TRANSFORMER, **extra})
    g = torch.Generator().manual_seed(0)
    b, f, h, w, a_len, s = 2, 2, 2, 3, 5, 7
    wide = 32 if extra else 16
    mask = torch.ones(b, s)
    mask[0, :3] = 0
    inputs = dict(hidden_states=torch.randn(b, f * h * w, 8, generator=g),
                  audio_hidden_states=torch.randn(b, a_len, 128, generator=g),
                  encoder_hidden_states=torch.randn(b, s, wide, generator=g),
                  audio_encoder_hidden_states=torch.randn(b, s, 16, generator=g),
                  timestep=torch.tensor([700.0, 300.0]), sigma=torch.tensor([700.0, 300.0]),
                  encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=f, height=h, width=w,
                  fps=24.0, audio_num_frames=a_len)
    for variant in ({}, {"isolate_modalities": True}, {"spatio_temporal_guidance_blocks": [0]}):
        with torch.no_grad():
            expected = ref(**inputs, **variant, return_dict=False)
            got = mine(**inputs, **variant)
        for e, o in zip(expected, got):
            _close(e, o)
    with torch.no_grad():  # each guidance variant really changes the prediction
        plain = mine(**inputs)[0]
        assert (mine(**inputs, isolate_modalities=True)[0] - plain).abs().max() > 1e-3
        assert (mine(**inputs, spatio_temporal_guidance_blocks=[0])[0] - plain).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [{}, dict(per_modality_projections=True, video_hidden_dim=16, audio_hidden_dim=16,
                                            proj_bias=True, video_gated_attn=True, audio_gated_attn=True),
                                   dict(video_connector_num_learnable_registers=None,
                                        audio_connector_num_learnable_registers=None)],
                         ids=["ltx2.0", "ltx2.3", "no-registers"])
def test_connectors_match_diffusers(extra):
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors as Ref

    from diffcore_ltx.connectors import LTX2TextConnectors

    ref, mine = _pair(Ref, LTX2TextConnectors, {**CONNECTORS, **extra})
    states = torch.randn(2, 16, 16 * 3, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :11], mask[1, :2] = 0, 0  # left padding, as the Gemma tokenizer pads
    with torch.no_grad():
        for e, o in zip(ref(states, mask), mine(states, mask)):
            _close(e, o)


@pytest.mark.parametrize("extra", [{}, dict(norm_type="group", causality_axis="none", mid_block_add_attention=True,
                                            attn_resolutions=(256, 128))], ids=["ltx2", "group-norm-attention"])
def test_audio_vae_matches_diffusers(extra):
    from diffusers import AutoencoderKLLTX2Audio as Ref

    from diffcore_ltx.audio_vae import AutoencoderKLLTX2Audio

    ref, mine = _pair(Ref, AutoencoderKLLTX2Audio, {**AUDIO_VAE, **extra})
    g = torch.Generator().manual_seed(2)
    z, mel = torch.randn(1, 8, 5, 16, generator=g), torch.randn(1, 2, 17, 64, generator=g)
    with torch.no_grad():
        _close(ref.decode(z).sample, mine.decode(z))
        _close(ref.encode(mel).latent_dist.mean, mine.encode(mel).mean)


def test_video_vae_matches_diffusers():
    from diffusers import AutoencoderKLLTX2Video as Ref

    from diffcore_ltx.video_vae import AutoencoderKLLTX2Video

    ref, mine = _pair(Ref, AutoencoderKLLTX2Video, VIDEO_VAE)
    assert (mine.spatial_compression_ratio, mine.temporal_compression_ratio) == (32, 8)
    g = torch.Generator().manual_seed(3)
    z, video = torch.randn(1, 8, 2, 2, 3, generator=g), torch.rand(1, 3, 9, 64, 96, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = mine.decode(z)
        assert decoded.shape == (1, 3, 9, 64, 96)  # 2 latent frames -> 8k + 1 = 9 frames
        _close(ref.decode(z).sample, decoded)
        posterior = ref.encode(video).latent_dist
        _close(posterior.mean, mine.encode(video).mean)
        _close(posterior.logvar, mine.encode(video).logvar)


def test_vocoder_matches_diffusers():
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as Ref

    from diffcore_ltx.vocoder import LTX2Vocoder

    ref, mine = _pair(Ref, LTX2Vocoder, VOCODER)
    mel = torch.randn(1, 2, 9, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        wave = mine(mel)
        assert wave.shape == (1, 2, 9 * 240)  # 240 samples per mel frame: 16 kHz / hop 160 -> 24 kHz
        _close(ref(mel), wave)


def test_ltx23_vocoder_stage_matches_diffusers():
    """LTX-2.3's vocoder stages: anti-aliased SnakeBeta activations, no final tanh, no output bias."""
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as Ref

    from diffcore_ltx.vocoder import LTX2Vocoder

    config = {**VOCODER, "act_fn": "snakebeta", "antialias": True, "final_act_fn": None, "final_bias": False}
    ref, mine = _pair(Ref, LTX2Vocoder, config)
    mel = torch.randn(1, 2, 9, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _close(ref(mel), mine(mel))
        plain = {k: v for k, v in mine.state_dict().items() if "act" not in k}
        snake = LTX2Vocoder.from_config({**config, "act_fn": "snake"}).eval()
        assert (snake.load_state_dict(ref.state_dict(), strict=False).unexpected_keys
                == [k for k in ref.state_dict() if k.endswith(".act.beta") and "act_out" not in k])
        assert plain  # the non-activation weights exist in both


def test_bwe_vocoder_matches_diffusers():
    """LTX2VocoderWithBWE (LTX-2.3): 16 kHz vocoder -> causal log-mel -> bandwidth extender + x3 resampler."""
    from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE as Ref

    from diffcore_ltx.bwe import LTX2VocoderWithBWE

    torch.manual_seed(5)
    ref = fill_bwe_buffers_(perturb_(Ref(**VOCODER_23).eval(), seed=5))
    mine = LTX2VocoderWithBWE.from_config(VOCODER_23).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    assert mine.output_sampling_rate == 48000
    mel = torch.randn(1, 2, 9, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        wave = mine(mel)
        assert wave.shape == (1, 2, 9 * 160 * 3)  # 160 samples per mel frame at 16 kHz, then x3 to 48 kHz
        _close(ref(mel), wave)
        # the extender matters: without its residual the output is the resampled 16 kHz waveform only
        mine.bwe_generator.conv_out.weight.zero_()
        assert (mine(mel) - wave).abs().max() > 1e-3


def test_vocoder_refuses_what_no_checkpoint_uses():
    from diffcore.errors import ConfigError
    from diffcore_ltx.vocoder import LTX2Vocoder

    with pytest.raises(ConfigError, match="antialias"):
        LTX2Vocoder.from_config({**VOCODER, "act_fn": "leaky_relu", "antialias": True})
    with pytest.raises(ConfigError, match="act_fn"):
        LTX2Vocoder.from_config({**VOCODER, "act_fn": "relu"})


def test_ltx23_video_vae_matches_diffusers():
    """LTX-2.3's video VAE: a zero-padded decoder with its own widths."""
    from diffusers import AutoencoderKLLTX2Video as Ref

    from diffcore_ltx.video_vae import AutoencoderKLLTX2Video

    ref, mine = _pair(Ref, AutoencoderKLLTX2Video, VIDEO_VAE_23)
    z = torch.randn(1, 8, 2, 2, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _close(ref.decode(z).sample, mine.decode(z))
