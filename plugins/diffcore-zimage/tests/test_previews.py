"""Z-Image previews (generate(on_preview=...), the server's partial images): pooled decode, result unchanged."""
from __future__ import annotations

from diffcore.testing.previews import assert_pooled_previews


def test_zimage_previews(generator):
    assert_pooled_previews(generator, prompt="a red circle", seed=1, height=64, width=32, num_inference_steps=4)
