"""LoRA on the LTX-2 transformer against diffusers + PEFT (fp32): a diffusers-format adapter over the video,
audio and cross-modal attention and feed-forward layers, per request and fused."""
from __future__ import annotations

import numpy as np
import torch

from diffcore.testing.lora import diffusers_with_loras, save_peft_lora

from ltx_testlib import SMALL
from test_pipeline import PROMPT, assert_parity

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "audio_proj_in", "proj_out"]


def test_adapter_matches_diffusers(generator, t2v_checkpoint, tmp_path):
    from diffusers import LTX2Pipeline, LTX2VideoTransformer3DModel

    path = save_peft_lora(LTX2Pipeline, LTX2VideoTransformer3DModel, t2v_checkpoint, tmp_path / "a", TARGETS, rank=4,
                          alpha=3, seed=1, std=0.2)
    generator.load_lora(path, name="a")
    base = generator.generate(prompt=PROMPT, seed=0, output_type="np", **SMALL)
    ours = generator.generate(prompt=PROMPT, seed=0, output_type="np", loras={"a": 0.8}, **SMALL)
    pipe = diffusers_with_loras(LTX2Pipeline.from_pretrained(t2v_checkpoint, dtype=torch.float32), {"a": (path, 0.8)})
    pipe.set_progress_bar_config(disable=True)
    frames, audio = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np",
                         return_dict=False, **SMALL)
    assert np.abs(ours.output - base.output).max() > 0.01  # the adapter changes the video...
    assert np.abs(ours.audios - base.audios).max() > 0.01  # ... and the sound
    assert_parity(frames, audio.float().numpy(), ours)
    generator.fuse_lora({"a": 0.8})
    fused = generator.generate(prompt=PROMPT, seed=0, output_type="np", **SMALL)
    generator.unfuse_lora()
    assert_parity(frames, audio.float().numpy(), fused)
    np.testing.assert_array_equal(generator.generate(prompt=PROMPT, seed=0, output_type="np", **SMALL).output,
                                  base.output)


def _to_original(key: str) -> str:
    """A diffusers-layout key in LTX-2's own layout (the inverse of the converter's renames, for the test)."""
    from diffcore_ltx.lora import RENAMES, TIME_EMBEDS

    name = key.removeprefix("transformer.")
    for original, diffusers in TIME_EMBEDS:
        if name.startswith(diffusers):
            name = original + name[len(diffusers):]
    for original, diffusers in reversed(RENAMES):
        if name.startswith(diffusers) or f".{diffusers}" in name or f"{diffusers}." in name:
            name = name.replace(diffusers, original)
    return "diffusion_model." + name


def test_original_layout_matches_diffusers_conversion(generator, t2v_checkpoint, tmp_path):
    from diffusers import LTX2Pipeline, LTX2VideoTransformer3DModel
    from safetensors.torch import load_file, save_file

    path = save_peft_lora(LTX2Pipeline, LTX2VideoTransformer3DModel, t2v_checkpoint, tmp_path / "d",
                          ["to_q", "to_out.0", "audio_proj_in", "proj_in", "linear"], rank=2, alpha=2, seed=3, std=0.2)
    state = load_file(path)
    original = {_to_original(k): v for k, v in state.items()}
    assert any(k.startswith("diffusion_model.adaln_single.") for k in original)  # the renames are exercised
    assert any(".av_ca_a2v_gate_adaln_single." in k for k in original)
    assert any(k.startswith("diffusion_model.audio_patchify_proj.") for k in original)
    file = tmp_path / "original.safetensors"
    save_file(original, file)
    name = generator.load_lora(file, name="orig")
    assert generator.loras[name].format == "ltx2-original"
    ours = generator.generate(prompt=PROMPT, seed=0, output_type="np", loras={name: 1.0}, **SMALL)
    base = generator.generate(prompt=PROMPT, seed=0, output_type="np", **SMALL)
    assert np.abs(ours.output - base.output).max() > 0.01  # the converted adapter is applied
    pipe = diffusers_with_loras(LTX2Pipeline.from_pretrained(t2v_checkpoint, dtype=torch.float32), {"o": (file, 1.0)})
    pipe.set_progress_bar_config(disable=True)
    frames, audio = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np",
                         return_dict=False, **SMALL)
    assert_parity(frames, audio.float().numpy(), ours)
