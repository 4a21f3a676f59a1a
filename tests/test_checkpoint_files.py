"""Component folders: incomplete tokenizer / text-encoder folders are errors naming what is missing, the
tokenizer layouts transformers reads all load, and diffusers' precision ``variant`` files."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffcore import DiffGenerator, EngineArgs
from diffcore.errors import ConfigError, MissingFileError
from diffcore.loader.model_index import hub_ignore_patterns
from diffcore.testing.layouts import to_vocab_merges_tokenizer


def _same_picture(a, b):
    """Equal to fp32 GEMM rounding. Bitwise on the oneDNN path (weights re-laid out); on the portable
    path (DIFFCORE_PORTABLE=1) MKL's sgemm result depends on where the memory-mapped weights sit in the
    file, so two layouts of the same weights differ by ~1e-7. A wrong or missing weight moves it by >1e-3."""
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=3, output_type="np")


@pytest.fixture
def toy_copy(toy_folder, tmp_path):
    folder = tmp_path / "toy"
    shutil.copytree(toy_folder, folder)
    return folder


def _load(folder, manager, **kw):
    return DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, plugin_manager=manager, **kw)


@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",), ("merges.txt",)], ids=["empty", "config-only",
                                                                                        "merges-only"])
def test_incomplete_tokenizer_folder_names_the_folder_and_the_files(toy_copy, toy_manager, keep):
    """An emptied tokenizer/ used to load a 2-token vocabulary silently and draw another picture."""
    folder = toy_copy / "tokenizer"
    to_vocab_merges_tokenizer(folder)
    for f in folder.iterdir():
        if f.name not in keep:
            f.unlink()
    with pytest.raises(MissingFileError) as exc_info:
        _load(toy_copy, toy_manager)
    message = str(exc_info.value)
    assert str(folder) in message and "component 'tokenizer'" in message
    assert "tokenizer.json or vocab.json + merges.txt" in message
    assert ("found: nothing" in message) if not keep else (f"found: {keep[0]}" in message)


def test_text_encoder_folder_without_config_names_it(toy_copy, toy_manager):
    (toy_copy / "text_encoder" / "config.json").unlink()
    with pytest.raises(MissingFileError, match=r"text_encoder.*needs config.json \(found: model.safetensors\)"):
        _load(toy_copy, toy_manager)


def test_vocab_merges_tokenizer_layout_gives_the_same_output(toy_copy, toy_gen, toy_manager):
    """The slow-tokenizer files alone (no tokenizer.json), as older checkpoints ship them."""
    to_vocab_merges_tokenizer(toy_copy / "tokenizer")
    assert not (toy_copy / "tokenizer" / "tokenizer.json").exists()
    _same_picture(_load(toy_copy, toy_manager).generate(**KW).output, toy_gen.generate(**KW).output)


def _to_variant(folder: Path, variant: str, components=("transformer", "vae", "text_encoder")) -> None:
    """Rename the weights as diffusers' ``save_pretrained(variant=...)`` names them."""
    for name in components:
        for f in (folder / name).glob("*.safetensors"):
            stem, _, suffix = f.name.rpartition(".")
            f.rename(f.with_name(f"{stem}.{variant}.{suffix}"))


def test_variant_files_load_with_variant_and_are_named_without(toy_copy, toy_gen, toy_manager):
    _to_variant(toy_copy, "fp16")
    with pytest.raises(MissingFileError, match=r"precision-variant weights \(fp16\).*variant='fp16'.*--variant fp16"):
        _load(toy_copy, toy_manager)
    gen = _load(toy_copy, toy_manager, variant="fp16")
    _same_picture(gen.generate(**KW).output, toy_gen.generate(**KW).output)
    with pytest.raises(MissingFileError, match=r"variant='bf16': no component .* \(it holds fp16\)"):
        _load(toy_copy, toy_manager, variant="bf16")


def test_variant_falls_back_to_plain_weights_per_component(toy_copy, toy_gen, toy_manager):
    """As in diffusers: a component without the variant's files uses its plain ones."""
    _to_variant(toy_copy, "fp16", components=("transformer",))
    gen = _load(toy_copy, toy_manager, variant="fp16")
    _same_picture(gen.generate(**KW).output, toy_gen.generate(**KW).output)


def test_variant_argument_is_validated_and_hub_downloads_follow_it():
    with pytest.raises(ConfigError, match="variant must be a weight-file variant name"):
        EngineArgs(variant="../fp16")
    assert "*.fp16.*" in hub_ignore_patterns() and "*.bf16.*" in hub_ignore_patterns()
    assert "*.fp16.*" not in hub_ignore_patterns("fp16") and "*.bf16.*" in hub_ignore_patterns("fp16")


def test_sentencepiece_only_tokenizer_without_protobuf_says_what_to_install(tmp_path, monkeypatch):
    """transformers 5 would fall back to a tiktoken reader and fail with an unrelated message."""
    import sys

    from transformers import T5Tokenizer

    from diffcore.errors import LoaderError
    from diffcore.loader.required_files import check_tokenizer_folder

    import google.protobuf

    (tmp_path / "spiece.model").write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "google.protobuf", None)  # import fails as if not installed
    with pytest.raises(LoaderError, match=r"sentencepiece model but no tokenizer.json.*pip install protobuf"):
        check_tokenizer_folder(tmp_path, T5Tokenizer, "component 'tokenizer_2'")
    monkeypatch.setitem(sys.modules, "google.protobuf", google.protobuf)
    check_tokenizer_folder(tmp_path, T5Tokenizer, "component 'tokenizer_2'")  # with protobuf: left to transformers
