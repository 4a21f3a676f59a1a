"""Tiny Z-Image checkpoints (diffusers' names and configs, diffcore's own modules) and generators loaded from them.

Fixtures from diffcore's pytest plugin (installed with diffcore): ``isolated_plugin_manager``.
The folder name picks the config as for real checkpoints: ``...-turbo`` is Z-Image-Turbo, else Z-Image (base).
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """{"turbo": ..., "base": ..., "img2img": ...}: the same tiny weights under each pipeline / name."""
    from diffcore_zimage.testing import write_tiny_zimage

    root = tmp_path_factory.mktemp("zimage")
    return {"turbo": write_tiny_zimage(root / "tiny-z-image-turbo"),
            "base": write_tiny_zimage(root / "tiny-z-image", shift=6.0),
            "img2img": write_tiny_zimage(root / "tiny-z-image-img2img", pipeline="ZImageImg2ImgPipeline")}


@pytest.fixture(scope="session")
def tiny_checkpoint(folders):
    return folders["turbo"]


@pytest.fixture
def load(isolated_plugin_manager):
    """``load(folder, **engine_args)``: a DiffGenerator in fp32, with only this plugin registered."""
    import diffcore_zimage.plugin
    from diffcore import DiffGenerator

    manager = isolated_plugin_manager(diffcore_zimage.plugin)

    def make(folder, **kwargs):
        return DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, plugin_manager=manager, **kwargs)

    return make


@pytest.fixture
def generator(load, folders):
    return load(folders["turbo"])


@pytest.fixture
def base(load, folders):
    return load(folders["base"])
