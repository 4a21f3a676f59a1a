"""A model folder only refers to its own files; unpickling needs an explicit True (issue 30 items 1-2)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffcore import DiffGenerator
from diffcore.errors import ConfigError, PickleRefusedError, UnsafePathError
from diffcore.loader import find_weight_files, resolve_model_path
from diffcore.loader.containment import check_folder

SMALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=3, output_type="np")


def _same(gen, reference):
    """The same weights give the same picture (up to float reordering: other tests may change the thread count)."""
    np.testing.assert_allclose(gen.generate(**SMALL).output, reference.generate(**SMALL).output, rtol=0, atol=1e-5)


@pytest.fixture
def toy_copy(toy_folder, tmp_path):
    """A private copy of the toy checkpoint that a test may edit."""
    return shutil.copytree(toy_folder, tmp_path / "model")


def _shard_transformer(folder, shard_name: str, outside_dir=None):
    """Replace transformer/diffusion_pytorch_model.safetensors by an index whose weight_map names ``shard_name``."""
    comp = folder / "transformer"
    weights = comp / "diffusion_pytorch_model.safetensors"
    target = (outside_dir or comp) / "x.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(weights, target)
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as f:
        keys = list(f.keys())
    index = comp / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: shard_name for k in keys}}))
    return index, keys


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_weight_map_outside_the_folder_is_refused(toy_copy, tmp_path, toy_manager, how):
    outside = tmp_path / "outside"
    name = "../../outside/x.safetensors" if how == "dotdot" else str(outside / "x.safetensors")
    index, keys = _shard_transformer(toy_copy, name, outside_dir=outside)
    with pytest.raises(UnsafePathError) as e:
        DiffGenerator.from_pretrained(toy_copy, dtype="float32", progress=False, plugin_manager=toy_manager)
    assert e.value.entry == f"weight_map[{keys[0]!r}]" and e.value.file == str(index)
    assert name in str(e.value) and "outside the model folder" in str(e.value)


def test_weight_map_inside_the_folder_still_loads(toy_copy, toy_gen, toy_manager):
    _shard_transformer(toy_copy, "x.safetensors")
    gen = DiffGenerator.from_pretrained(toy_copy, dtype="float32", progress=False, plugin_manager=toy_manager)
    _same(gen, toy_gen)


def test_weight_map_entry_that_is_not_a_name(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": ["a", "b"]}}))
    with pytest.raises(UnsafePathError, match=r"weight_map\['w'\] must be a file name"):
        find_weight_files(tmp_path)


@pytest.mark.parametrize("what", ["weights", "component folder", "tokenizer file", "variant weights"])
def test_links_leaving_the_folder_are_refused_unless_allowed(toy_copy, tmp_path, toy_gen, toy_manager, what):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if what == "weights":
        entry = toy_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    elif what == "component folder":
        entry = toy_copy / "vae"
    elif what == "tokenizer file":
        entry = next(p for p in (toy_copy / "tokenizer").iterdir() if p.suffix == ".json")
    else:
        entry = toy_copy / "transformer" / "diffusion_pytorch_model.fp16.safetensors"
        shutil.copy(toy_copy / "transformer" / "diffusion_pytorch_model.safetensors", entry)
    moved = outside / entry.name
    shutil.move(entry, moved)
    entry.symlink_to(moved, target_is_directory=moved.is_dir())
    load = dict(dtype="float32", progress=False, plugin_manager=toy_manager)
    with pytest.raises(UnsafePathError, match="--allow-external-links") as e:
        DiffGenerator.from_pretrained(toy_copy, **load)
    assert e.value.entry == str(entry.relative_to(toy_copy)) and str(moved) in str(e.value)
    gen = DiffGenerator.from_pretrained(toy_copy, allow_external_links=True, **load)
    _same(gen, toy_gen)


def test_links_inside_the_folder_and_hub_blobs_are_fine(tmp_path):
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    (snap / "vae").mkdir(parents=True)
    (repo / "blobs" / "1234").write_text("{}")
    (snap / "model_index.json").symlink_to(os.path.relpath(repo / "blobs" / "1234", snap))
    (snap / "vae" / "config.json").symlink_to(snap / "model_index.json")
    check_folder(snap)  # the Hub cache layout: links into the repo's blobs/, and links within the folder
    assert resolve_model_path(snap) == snap.resolve()
    (snap / "vae" / "evil.json").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError, match="evil.json"):
        resolve_model_path(snap)


@pytest.mark.parametrize("value", ["no", "yes", 1, 0, None, "True"])
def test_allow_pickle_must_be_a_real_bool(toy_folder, toy_manager, value):
    with pytest.raises(ConfigError, match="allow_pickle must be True or False"):
        DiffGenerator.from_pretrained(toy_folder, allow_pickle=value, progress=False, plugin_manager=toy_manager)
    with pytest.raises(ConfigError, match="allow_pickle"):
        find_weight_files(toy_folder / "transformer", allow_pickle=value)


def test_pickle_folder_with_string_no_is_refused(toy_copy, toy_manager):
    comp = toy_copy / "transformer"
    from safetensors.torch import load_file

    torch.save(load_file(comp / "diffusion_pytorch_model.safetensors"), comp / "diffusion_pytorch_model.bin")
    (comp / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="allow_pickle"):
        find_weight_files(comp, allow_pickle="no")
    with pytest.raises(PickleRefusedError):
        find_weight_files(comp)
    assert find_weight_files(comp, allow_pickle=True) == [comp / "diffusion_pytorch_model.bin"]


@pytest.mark.parametrize("suffix", [".pt", ".bin", ""])
def test_pickle_given_as_gguf_needs_allow_pickle(toy_folder, toy_gen, toy_manager, tmp_path, suffix):
    from safetensors.torch import load_file

    pickled = tmp_path / f"transformer{suffix}"
    torch.save(load_file(toy_folder / "transformer" / "diffusion_pytorch_model.safetensors"), pickled)
    load = dict(dtype="float32", progress=False, plugin_manager=toy_manager, gguf=str(pickled))
    with pytest.raises(PickleRefusedError, match="allow_pickle=True") as e:
        DiffGenerator.from_pretrained(toy_folder, **load)
    assert str(pickled) in str(e.value)
    with pytest.raises(ConfigError, match="allow_pickle"):
        DiffGenerator.from_pretrained(toy_folder, allow_pickle="no", **load)
    gen = DiffGenerator.from_pretrained(toy_folder, allow_pickle=True, **load)
    _same(gen, toy_gen)


def test_safetensors_given_as_single_file_needs_no_consent(toy_folder, toy_gen, toy_manager):
    single = toy_folder / "transformer" / "diffusion_pytorch_model.safetensors"
    gen = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                        gguf=str(single))
    _same(gen, toy_gen)


def test_lora_weight_name_stays_in_its_folder(toy_gen, tmp_path):
    from diffcore.errors import LoraFormatError

    (tmp_path / "lora").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "secret.safetensors"))
    with pytest.raises(LoraFormatError, match="outside"):
        toy_gen.load_lora(tmp_path / "lora", weight_name="../secret.safetensors")
    assert not toy_gen.loras
