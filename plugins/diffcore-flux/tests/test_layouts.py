"""Compatibility matrix: FLUX and FLUX Kontext folders in the other layouts real checkpoints use load and
match diffusers on the same folder (fp32: max |diff| <= 2e-3, PSNR >= 45 dB). The layout as saved is
test_pipeline_parity.py's; the independent variations are combined in one folder per pipeline: diffusers'
fp16 variant files, the CLIP tokenizer as vocab.json + merges.txt, T5's as spiece.model, both text
encoders sharded (model.safetensors.index.fp16.json)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.layouts import write_all_layouts
from diffcore.testing.weights import assert_parity


@pytest.mark.parametrize("kind", ["dev", "kontext"])
def test_every_layout_loads_and_matches_diffusers(flux_folders, tmp_path, kind):
    from diffusers import FluxKontextPipeline, FluxPipeline

    cls = FluxKontextPipeline if kind == "kontext" else FluxPipeline
    folder = tmp_path / kind
    changes = write_all_layouts(cls.from_pretrained(flux_folders[kind], torch_dtype=torch.float32), folder)
    assert changes["tokenizer"] == "vocab.json + merges.txt" and changes["tokenizer_2"] == "spiece.model"
    assert "shards" in changes["text_encoder"] and "shards" in changes["text_encoder_2"]
    kw = dict(prompt=["a red circle", "two yellow squares"], height=32, width=48, num_inference_steps=2,
              guidance_scale=3.5, max_sequence_length=24)
    ref_kw = dict(kw)
    if kind == "kontext":
        kw["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
        ref_kw = {**kw, "max_area": 32 * 48, "_auto_resize": False}  # the image as it is: no ~1 MP VAE encode
    ref = cls.from_pretrained(folder, torch_dtype=torch.float32, variant="fp16")(
        **ref_kw, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, variant="fp16")
    if kind == "kontext":
        gen.config.auto_resize = False
    assert_parity(gen.generate(**kw, seed=5, output_type="np").output, ref)
