"""LTX-2.3-shaped folders (written by diffusers) load and match diffusers: gated attention, cross-attention
modulation, per-modality connector projections, the zero-padded video decoder and the 48 kHz vocoder with
bandwidth extension (``LTX2VocoderWithBWE``)."""
from __future__ import annotations

import json

import pytest

from ltx_testlib import SMALL, run_diffusers, write_checkpoint
from test_pipeline import PROMPT, assert_parity


@pytest.fixture(scope="module")
def ltx23_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ltx23") / "t2v", version="2.3")


def test_ltx23_folder_is_what_diffusers_writes(ltx23_checkpoint):
    index = json.loads((ltx23_checkpoint / "model_index.json").read_text())
    assert index["vocoder"] == ["ltx2", "LTX2VocoderWithBWE"]
    config = json.loads((ltx23_checkpoint / "transformer" / "config.json").read_text())
    assert config["gated_attn"] and config["cross_attn_mod"] and not config["use_prompt_embeddings"]


def test_ltx23_text_to_video_matches_diffusers(load, ltx23_checkpoint, tmp_path):
    from diffcore.audio import read_audio

    gen = load(ltx23_checkpoint)
    assert type(gen.pipeline.components["vocoder"]).__name__ == "LTX2VocoderWithBWE"
    frames, audio = run_diffusers(ltx23_checkpoint, prompt=PROMPT)
    result = gen.generate(prompt=PROMPT, seed=0, output_type="np", **SMALL)
    assert result.audio_sample_rate == 48000
    assert_parity(frames, audio, result)
    seconds = SMALL["num_frames"] / SMALL["frame_rate"]
    assert abs(result.audios.shape[-1] / 48000 - seconds) < 0.05
    saved = gen.generate(prompt=PROMPT, seed=0, **SMALL).save(tmp_path / "out.mp4")
    sound, rate = read_audio(saved)
    assert rate == 48000 and sound.shape[0] == 2 and abs(sound.shape[1] / rate - seconds) < 0.05
