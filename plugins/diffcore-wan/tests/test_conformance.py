"""diffcore.testing conformance checks on the tiny Wan checkpoints (video outputs)."""
from __future__ import annotations

import pytest

from diffcore import DiffGenerator
from diffcore.testing.conformance import check_bad_params, check_dataflow, check_determinism, check_output

SMALL = dict(num_inference_steps=2, max_sequence_length=16, num_frames=5, height=32, width=64)


@pytest.mark.parametrize("kind", ["t2v21", "t2v22", "ti2v"])
def test_wan_text_to_video_conformance(wan_folders, kind):
    gen = DiffGenerator.from_pretrained(wan_folders[kind], dtype="float32", progress=False)
    assert check_dataflow(gen)[0] == "input_validation"
    result = check_output(gen, prompt="a cat", **SMALL)
    assert result.output.shape == (1, 5, 32, 64, 3)
    check_determinism(gen, seed=3, prompt="a cat", **SMALL)
    check_bad_params(gen, prompt="a cat", **SMALL)
