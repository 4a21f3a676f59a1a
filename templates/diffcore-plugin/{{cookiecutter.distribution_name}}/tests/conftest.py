"""A tiny {{ cookiecutter.family }} checkpoint in Diffusers format (``{{ cookiecutter.package_name }}.testing``), and a
generator loaded from it.

Fixtures from diffcore's pytest plugin (installed with diffcore): ``isolated_plugin_manager``.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline


@pytest.fixture
def tiny_transformer_config():
    from {{ cookiecutter.package_name }}.testing import TINY_TRANSFORMER

    return dict(TINY_TRANSFORMER)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from {{ cookiecutter.package_name }}.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("{{ cookiecutter.family }}") / "model")


@pytest.fixture
def generator(isolated_plugin_manager, tiny_checkpoint):
    """The checkpoint loaded by diffcore's real loader, with only this plugin registered."""
    import {{ cookiecutter.package_name }}.plugin
    from diffcore import DiffGenerator

    isolated_plugin_manager({{ cookiecutter.package_name }}.plugin)
    return DiffGenerator.from_pretrained(tiny_checkpoint, dtype="float32", progress=False)
