"""Tiny LTX-2 checkpoints written by diffusers (the oracle) and generators loaded from them by diffcore.

Fixtures from diffcore's pytest plugin (installed with diffcore): ``isolated_plugin_manager``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def t2v_checkpoint(tmp_path_factory):
    from ltx_testlib import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ltx") / "t2v")


@pytest.fixture(scope="session")
def i2v_checkpoint(tmp_path_factory):
    from ltx_testlib import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ltx") / "i2v", image_to_video=True)


def _load(isolated_plugin_manager, folder, **kw):
    import diffcore_ltx.plugin
    from diffcore import DiffGenerator

    isolated_plugin_manager(diffcore_ltx.plugin)
    return DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, **kw)


@pytest.fixture
def generator(isolated_plugin_manager, t2v_checkpoint):
    """The T2V checkpoint loaded by diffcore's real loader, with only this plugin registered."""
    return _load(isolated_plugin_manager, t2v_checkpoint)


@pytest.fixture
def i2v_generator(isolated_plugin_manager, i2v_checkpoint):
    return _load(isolated_plugin_manager, i2v_checkpoint)


@pytest.fixture
def load(isolated_plugin_manager):
    return lambda folder, **kw: _load(isolated_plugin_manager, folder, **kw)
