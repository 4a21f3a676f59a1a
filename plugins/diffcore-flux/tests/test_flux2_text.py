"""FLUX.2 prompt features stop at the last hidden state they read: equal to transformers' own hidden states, the
decoder layers above it never run (tiny Mistral3 and Qwen3 text encoders with 4 spare layers)."""
from __future__ import annotations

import pytest
import torch

from diffcore_flux.flux2_text import MISTRAL_LAYERS, QWEN3_LAYERS, stacked_hidden_states


def _encoder(kind: str):
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                              Qwen3Config, Qwen3ForCausalLM)

    from diffcore.testing.weights import perturb_

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                head_dim=8, max_position_embeddings=128)
    if kind == "mistral":
        te = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=MistralConfig(num_hidden_layers=34, **text),
            vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, image_size=32, patch_size=8),
            image_token_index=63, spatial_merge_size=2))
    else:
        te = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=31, **text))
    perturb_(te, seed=1)
    return te.eval()


@pytest.mark.parametrize("kind,layers", [("mistral", MISTRAL_LAYERS), ("qwen3", QWEN3_LAYERS)])
def test_features_equal_transformers_and_upper_layers_do_not_run(kind, layers):
    te = _encoder(kind)
    inputs = {"input_ids": torch.randint(0, 63, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    inputs["attention_mask"][1, 8:] = 0  # padding, as the pipelines pad to max_sequence_length
    ran = []
    blocks = te.model.language_model.layers if kind == "mistral" else te.model.layers
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.inference_mode():
        ours = stacked_hidden_states(te, inputs, layers)
        assert ran == list(range(max(layers)))  # layers 0 .. max-1: hidden state k is layer k-1's output
        assert all(len(b._forward_hooks) == 1 for b in blocks)  # only the test's counter: our taps are removed
        ran.clear()
        out = te(**inputs, output_hidden_states=True, use_cache=False)
    assert len(ran) == len(blocks)
    want = torch.cat([out.hidden_states[k] for k in layers], dim=-1)
    assert ours.shape == (2, 12, 3 * 16)
    assert torch.equal(ours, want)
