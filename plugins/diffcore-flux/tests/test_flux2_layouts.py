"""Compatibility matrix for FLUX.2: [dev] and [klein] folders in the other layouts real checkpoints use (diffusers'
fp16 variant files, the tokenizer as vocab.json + merges.txt with its chat template beside it, the text encoder
sharded) load and match diffusers on the same folder (fp32: max |diff| <= 2e-3, PSNR >= 45 dB)."""
from __future__ import annotations

import pytest
import torch

from diffcore import DiffGenerator
from diffcore.testing.layouts import write_all_layouts
from diffcore.testing.weights import assert_parity


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_every_layout_loads_and_matches_diffusers(flux2_folders, tmp_path, kind):
    import diffusers

    cls = diffusers.Flux2Pipeline if kind == "dev" else diffusers.Flux2KleinPipeline
    folder = tmp_path / kind
    changes = write_all_layouts(cls.from_pretrained(flux2_folders[kind], torch_dtype=torch.float32), folder)
    assert changes["tokenizer"] == "vocab.json + merges.txt" and "shards" in changes["text_encoder"]
    kw = dict(prompt=["a red circle", "two yellow squares"], height=32, width=48, num_inference_steps=2,
              max_sequence_length=24)
    ref = cls.from_pretrained(folder, torch_dtype=torch.float32, variant="fp16")(
        **kw, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, variant="fp16")
    assert_parity(gen.generate(**kw, seed=5, output_type="np").output, ref)
