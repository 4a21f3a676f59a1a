"""A config.json that would build an absurd model is refused with its size, before allocation (issue 30 item 5)."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from diffcore import DiffGenerator
from diffcore.errors import ConfigError, ConfigFileError

SMALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=3, output_type="np")


@pytest.fixture
def toy_copy(toy_folder, tmp_path):
    return shutil.copytree(toy_folder, tmp_path / "model")


def _edit(folder, component, **values):
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return path


def _load(folder, manager):
    return DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, plugin_manager=manager)


def test_a_billion_layers_is_refused_from_the_config(toy_copy, toy_manager):
    path = _edit(toy_copy, "transformer", num_layers=10**9)
    start = time.perf_counter()
    with pytest.raises(ConfigFileError, match="num_layers=1,000,000,000") as e:
        _load(toy_copy, toy_manager)
    assert e.value.field == "num_layers" and e.value.file == str(path) and time.perf_counter() - start < 30


def test_a_huge_width_is_refused_with_the_count_before_allocating(toy_copy, toy_manager, monkeypatch):
    path = _edit(toy_copy, "transformer", hidden_size=2**20, joint_attention_dim=2**20)
    with pytest.raises(ConfigFileError, match=r"more than [\d,]+ parameters .* budget of 100,000,000,000") as e:
        _load(toy_copy, toy_manager)
    assert e.value.file == str(path)


def test_the_budget_is_configurable_and_the_toy_fits(toy_folder, toy_gen, toy_manager, monkeypatch):
    monkeypatch.setenv("DIFFCORE_MAX_PARAMS", "1000")
    with pytest.raises(ConfigFileError, match="budget of 1,000"):
        _load(toy_folder, toy_manager)
    monkeypatch.setenv("DIFFCORE_MAX_PARAMS", "lots")
    with pytest.raises(ConfigError, match="DIFFCORE_MAX_PARAMS"):
        _load(toy_folder, toy_manager)
    monkeypatch.delenv("DIFFCORE_MAX_PARAMS")
    np.testing.assert_allclose(_load(toy_folder, toy_manager).generate(**SMALL).output,
                               toy_gen.generate(**SMALL).output, rtol=0, atol=1e-5)


def test_a_text_encoder_config_with_absurd_depth_is_refused(toy_copy, toy_manager):
    _edit(toy_copy, "text_encoder", num_hidden_layers=10**8)
    with pytest.raises(ConfigFileError, match="num_hidden_layers"):
        _load(toy_copy, toy_manager)


@pytest.mark.parametrize("key, value", [
    ("n_layers", 10**9), ("n_refiner_layers", 10**9),  # Z-Image's transformer
    ("video_connector_num_layers", 10**9),  # LTX-2's text connectors
    ("layers_per_block", [4, 6, 10**9, 2]),  # LTX-2's video VAE: one count per stage
    ("num_single_layers", 10**9),  # FLUX.2's transformer
])
def test_every_familys_spelling_of_a_depth_is_refused_from_the_config(toy_copy, toy_manager, key, value):
    """The new families name their depths otherwise than num_layers (issue 30, rechecked for FLUX.2, Z-Image,
    LTX-2): each spelling, in a component's config.json, is refused before anything is built."""
    _edit(toy_copy, "transformer", **{key: value})
    with pytest.raises(ConfigFileError, match=f"{key}=1,000,000,000") as e:
        _load(toy_copy, toy_manager)
    assert e.value.field == key
