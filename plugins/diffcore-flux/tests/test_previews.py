"""FLUX.1 (dev, Kontext) and FLUX.2 preview (generate(on_preview=...), the server's partial images): their packed
latents unpack, pool and decode on the smaller grid; the result is unchanged."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.previews import assert_pooled_previews


@pytest.mark.parametrize("variant", ["dev", "kontext"])
def test_flux_previews(flux_folders, variant):
    gen = DiffGenerator.from_pretrained(flux_folders[variant], dtype="float32", progress=False)
    extra = {}
    if variant == "kontext":
        gen.config.auto_resize = False  # test speed: encode the input at its own size
        extra["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8))
    assert_pooled_previews(gen, prompt="a red circle", seed=1, height=32, width=64, num_inference_steps=4, **extra)


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_flux2_previews(flux2_folders, kind):
    gen = DiffGenerator.from_pretrained(flux2_folders[kind], dtype="float32", progress=False)
    assert_pooled_previews(gen, prompt="a cat", seed=0, height=64, width=64, num_inference_steps=4,
                           max_sequence_length=16)
