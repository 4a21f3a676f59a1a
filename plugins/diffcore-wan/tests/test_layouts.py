"""Compatibility matrix: every Wan pipeline's folder (2.1 T2V, 2.2 T2V-A14B, TI2V-5B, 2.1 I2V with CLIP,
2.2 I2V-A14B) in the other layouts real checkpoints use loads and matches diffusers on the same folder
(fp32, all frames: max |diff| <= 2e-3, PSNR >= 45 dB). The layout as saved is test_pipeline_parity.py's;
the independent variations are combined in one folder per pipeline: diffusers' fp16 variant files, the
UMT5 tokenizer as spiece.model (no tokenizer.json), the UMT5 and CLIP vision encoders sharded
(model.safetensors.index.fp16.json)."""
from __future__ import annotations

import pytest
import torch

from diffcore import DiffGenerator
from diffcore.testing.layouts import write_all_layouts
from wan_testlib import KINDS, compare, random_image, reference


@pytest.mark.parametrize("kind", KINDS)
def test_every_layout_loads_and_matches_diffusers(wan_folders, tmp_path, kind):
    folder = tmp_path / kind
    changes = write_all_layouts(reference(wan_folders[kind], kind), folder)
    assert changes["tokenizer"] == "spiece.model" and "shards" in changes["text_encoder"]
    assert ("shards" in changes["image_encoder"]) if kind == "i2v21" else "image_encoder" not in changes
    kw = dict(prompt="a red circle", negative_prompt="blurry", num_frames=5, height=32, width=32,
              num_inference_steps=2, guidance_scale=4.0)
    if kind.startswith("i2v"):
        kw["image"] = random_image(40, 40, seed=1)
    ref = reference(folder, kind, variant="fp16")(**kw, generator=torch.Generator("cpu").manual_seed(2),
                                                 output_type="np").frames
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, variant="fp16")
    compare(gen.generate(**kw, seed=2, output_type="np").output, ref)
