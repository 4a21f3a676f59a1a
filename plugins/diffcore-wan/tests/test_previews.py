"""Wan previews (generate(on_preview=...)): a video's predicted clean latents decode to preview frames on the
pooled grid (UniPC's x0, DMD's x0 per step); the block-causal loop streams blocks instead and cannot preview."""
from __future__ import annotations

import pytest

from diffcore import DiffGenerator
from diffcore.errors import SamplingParamError
from diffcore.testing.previews import assert_pooled_previews


@pytest.mark.parametrize("kind", ["t2v21", "dmd"])
def test_wan_previews(wan_folders, fewstep_folders, kind):
    folder = wan_folders[kind] if kind in wan_folders else fewstep_folders[kind]
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    steps = {} if kind == "dmd" else {"num_inference_steps": 4}
    got = assert_pooled_previews(gen, prompt="a cat", seed=2, height=32, width=64, num_frames=5, **steps)
    assert got[0].output.ndim == 5  # (B, F, H, W, 3)


def test_causal_wan_cannot_preview(fewstep_folders):
    gen = DiffGenerator.from_pretrained(fewstep_folders["causal"], dtype="float32", progress=False)
    assert not gen.can_preview
    with pytest.raises(SamplingParamError):
        gen.generate(prompt="a cat", on_preview=print, height=32, width=48, num_frames=9)
