"""diffcore.testing conformance checks on the tiny Qwen-Image checkpoints."""
from __future__ import annotations

import numpy as np
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.conformance import check_bad_params, check_dataflow, check_determinism, check_output

SMALL = dict(num_inference_steps=2, max_sequence_length=32, height=32, width=64, true_cfg_scale=2.0)


def test_qwen_image_conformance(qwen_folders):
    gen = DiffGenerator.from_pretrained(qwen_folders["t2i"], dtype="float32", progress=False)
    assert check_dataflow(gen)[0] == "input_validation"
    result = check_output(gen, prompt=["a cat", "a red dog on a blue mat"], **SMALL)
    assert result.output.shape == (2, 32, 64, 3)
    check_determinism(gen, seed=3, prompt="a cat", **SMALL)
    check_bad_params(gen, prompt="a cat", **SMALL)


def test_qwen_edit_conformance(qwen_folders):
    gen = DiffGenerator.from_pretrained(qwen_folders["edit"], dtype="float32", progress=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    assert "image_vae_encoding" in check_dataflow(gen)
    check_output(gen, prompt="make it red", image=image, **SMALL)
    check_determinism(gen, seed=1, prompt="make it red", image=image, **SMALL)
