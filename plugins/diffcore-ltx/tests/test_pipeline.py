"""LTX-2 end to end against diffusers' pipelines on tiny perturbed checkpoints: frames and waveform."""
from __future__ import annotations

import json

import numpy as np
import pytest

from diffcore.testing.conformance import check_dataflow, check_determinism

from ltx_testlib import SMALL, run_diffusers

PROMPT = "a red cat plays a drum"


def psnr(a, b, peak: float) -> float:
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def assert_parity(expected_frames, expected_audio, result):
    frames, audio = result.output, result.audios
    assert frames.shape == expected_frames.shape and audio.shape == expected_audio.shape
    assert np.abs(frames - expected_frames).max() <= 2e-3 and psnr(frames, expected_frames, 1.0) >= 45
    # the waveform as a signal: its range is [-1, 1] (peak-to-peak 2)
    assert np.abs(audio - expected_audio).max() <= 2e-3 and psnr(audio, expected_audio, 2.0) >= 45
    assert np.abs(expected_audio).mean() > 0.05  # a real signal, not silence


def test_checkpoint_is_in_diffusers_format(t2v_checkpoint):
    index = json.loads((t2v_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline"
    assert index["connectors"] == ["ltx2", "LTX2TextConnectors"] and index["vocoder"] == ["ltx2", "LTX2Vocoder"]
    assert index["text_encoder"] == ["transformers", "Gemma3ForConditionalGeneration"]


@pytest.mark.parametrize("guidance", [
    {},  # the dev defaults: CFG (video 3, audio 7), STG, modality isolation, rescale 0.7
    dict(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
         audio_modality_scale=1.0),  # no guidance at all
], ids=["all-guidance", "no-guidance"])
def test_text_to_video_matches_diffusers(generator, t2v_checkpoint, guidance):
    frames, audio = run_diffusers(t2v_checkpoint, prompt=PROMPT, **guidance)
    result = generator.generate(prompt=PROMPT, seed=0, output_type="np", **SMALL, **guidance)
    assert result.audio_sample_rate == 24000 and result.fps == 24
    assert_parity(frames, audio, result)


def test_image_to_video_matches_diffusers(i2v_generator, i2v_checkpoint):
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8))
    frames, audio = run_diffusers(i2v_checkpoint, image_to_video=True, prompt=PROMPT, image=image, image_crf=0)
    result = i2v_generator.generate(prompt=PROMPT, image=image, image_crf=0, seed=0, output_type="np", **SMALL)
    assert_parity(frames, audio, result)
    other = i2v_generator.generate(prompt=PROMPT, image=Image.fromarray(255 - np.asarray(image)), image_crf=0, seed=0,
                                   output_type="np", **SMALL)
    assert np.abs(other.output - result.output).max() > 0.05  # the image conditions the video


def test_each_guidance_term_costs_a_call_only_when_active(generator):
    """Per step: 1 call (CFG doubles its batch: the core's cond and uncond branches merged into one call on
    [negative, positive], as diffusers), +1 for STG, +1 for isolation (the config's extra guidance branches)."""
    off = dict(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
               audio_modality_scale=1.0)
    cases = [(off, 1), ({**off, "guidance_scale": 3.0}, 1), ({**off, "audio_guidance_scale": 5.0}, 1),
             ({**off, "stg_scale": 1.0}, 2), ({**off, "audio_modality_scale": 2.0}, 2), ({}, 3)]
    outputs = []
    for kwargs, per_step in cases:
        denoiser = generator.pipeline.denoiser
        before = denoiser.calls
        outputs.append(generator.generate(prompt=PROMPT, seed=0, output_type="np", **{**SMALL, **kwargs}).output)
        assert denoiser.calls - before == per_step * SMALL["num_inference_steps"], kwargs
    # every term changes the result (each scale reaches the output)
    for out in outputs[1:]:
        assert np.abs(out - outputs[0]).max() > 1e-4


def test_rescale_and_audio_scales_reach_their_stream(generator):
    def run(**kw):
        return generator.generate(prompt=PROMPT, seed=0, output_type="np", **{**SMALL, **kw})

    base = run()
    rescaled = run(guidance_rescale=0.0)
    assert np.abs(rescaled.output - base.output).max() > 1e-4
    louder = run(audio_guidance_scale=2.0)  # the audio scale moves the audio first
    assert np.abs(louder.audios - base.audios).max() > 1e-3


def test_dataflow_and_determinism(generator):
    names = check_dataflow(generator)
    assert names[-1] == "audio_decoding"
    check_determinism(generator, prompt=PROMPT, seed=3, **SMALL)
    a = generator.generate(prompt=PROMPT, seed=3, output_type="np", **SMALL)
    b = generator.generate(prompt="a blue square hums", seed=3, output_type="np", **SMALL)
    assert np.abs(a.audios - b.audios).max() > 1e-3  # the prompt reaches the sound


def test_mp4_and_wav_carry_the_sound(generator, tmp_path):
    from diffcore.audio import read_audio

    result = generator.generate(prompt=PROMPT, seed=0, **SMALL)
    path = result.save(tmp_path / "out.mp4")
    sound, rate = read_audio(path)
    assert rate == 24000 and sound.shape[0] == 2
    expected_seconds = SMALL["num_frames"] / SMALL["frame_rate"]
    assert abs(sound.shape[1] / rate - expected_seconds) < 0.05
    assert abs(result.audio.shape[1] / rate - expected_seconds) < 0.05
    wav = result.save(tmp_path / "out.wav")
    assert read_audio(wav)[1] == 24000


def test_latent_output_has_no_sound(generator):
    result = generator.generate(prompt=PROMPT, seed=0, output_type="latent", **SMALL)
    assert result.output is None and result.audios is None and result.latents is not None


def test_stg_costs_nothing_where_the_model_cannot_perturb_attention(load, tmp_path):
    """LTX-2.0 transformers have no perturbed attention: diffusers' STG call repeats the positive prediction (a
    zero term); diffcore skips it and gives the same result with 2 calls per step instead of 3."""
    from ltx_testlib import write_checkpoint

    folder = write_checkpoint(tmp_path / "ltx20", perturbed_attn=False)
    gen = load(folder)
    before = gen.pipeline.denoiser.calls
    result = gen.generate(prompt=PROMPT, seed=0, output_type="np", **SMALL)
    assert gen.pipeline.denoiser.calls - before == 2 * SMALL["num_inference_steps"]  # CFG batch + isolation
    frames, audio = run_diffusers(folder, prompt=PROMPT)
    assert_parity(frames, audio, result)
