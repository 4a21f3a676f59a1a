"""EngineArgs(offload="model" | "layers"): the hooks move weights in and out; results equal no offload.

There is no GPU here, so the device is the CPU: every "move" is a real CPU-to-CPU copy (fresh tensors
each time, as on a GPU), which the tests observe through the parameters' storage.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.errors import ConfigError
from diffcore.offload import LayerOffload, blocks_of

KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, output_type="np")


@pytest.fixture(scope="module")
def reference(flux_folders):
    return DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False).generate(**KW).output


def test_model_offload_brings_each_component_in_while_it_runs(flux_folders, reference):
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False, offload="model")
    hooks = gen.pipeline.offload_hooks["model"]
    vae = gen.components["vae"]
    resting = {n: p.data_ptr() for n, p in vae.named_parameters()}
    out = gen.generate(**KW).output
    np.testing.assert_allclose(out, reference, atol=1e-6, rtol=0)
    assert hooks.moves == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert hooks.active.module is vae  # the last one stays until another starts
    assert all(p.data_ptr() != resting[n] for n, p in vae.named_parameters())  # a device copy is installed
    hooks.deactivate()
    assert {n: p.data_ptr() for n, p in vae.named_parameters()} == resting  # back to the resident copy
    gen.generate(**KW)
    assert hooks.moves[4:] == ["text_encoder", "text_encoder_2", "transformer", "vae"]


def test_layer_offload_copies_each_block_in_and_drops_it_after(flux_folders, reference):
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False, offload="layers")
    transformer = gen.components["transformer"]
    layers: LayerOffload = gen.pipeline.offload_hooks["transformer"]
    blocks = blocks_of(transformer)
    assert layers.blocks == blocks and len(blocks) == 3  # 1 double + 2 single blocks
    resting = [[p.data_ptr() for p in b.parameters()] for b in blocks]
    seen = []

    def spy(module, args):  # runs after the offload hook of the same block: the device copy is in place
        seen.append(all(p.data_ptr() not in resting[blocks.index(module)] for p in module.parameters()))

    for b in blocks:
        b.register_forward_pre_hook(spy)
    out = gen.generate(**KW).output
    np.testing.assert_allclose(out, reference, atol=1e-6, rtol=0)
    assert seen and all(seen) and len(seen) == 2 * len(blocks)  # 2 steps, no CFG
    loaded = [i for i, w in enumerate(layers.weights) if w.loaded is not None]
    assert loaded == [0]  # only the prefetched first block of the next step is held
    assert [[p.data_ptr() for p in b.parameters()] for b in blocks[1:]] == resting[1:]


def test_offload_choices_are_checked():
    with pytest.raises(ConfigError, match="unknown offload 'gpu'"):
        DiffGenerator.from_pretrained("unused", offload="gpu")
    with pytest.raises(ConfigError, match="no nn.ModuleList of blocks"):
        LayerOffload(torch.nn.Linear(2, 2), "cpu")
