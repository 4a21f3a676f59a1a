"""pytest plugin shipped with diffcore (entry point ``pytest11``): fixtures for plugin authors.

Available in any pytest run where diffcore is installed; nothing here is autouse, so it changes
no test that does not ask for it. Kept cheap to import (no torch): pytest loads it at start-up.

* ``isolated_plugin_manager``: the process-wide plugin manager holds diffcore's built-ins only (no
  installed plugin leaks in); call the fixture with plugin modules to add exactly those::

      def test_load(isolated_plugin_manager, tmp_path):
          import diffcore_toy.plugin
          manager = isolated_plugin_manager(diffcore_toy.plugin)
          assert "ToyPipeline" in manager.registry.names("pipelines")

* ``diffcore_offline``: ``HF_HUB_OFFLINE=1`` for the test, so nothing tries the network.

* ``fastpath_mode``: runs the test twice, ``"fast"`` (the CPU fast paths this machine allows, whatever
  ``DIFFCORE_PORTABLE`` says) and ``"portable"`` (every portable path forced, as on a CPU where none
  works), so one machine proves both. Use it on bf16 and fast-path tests.

Checkpoint writers live in ``diffcore.testing.checkpoints``, conformance checks in
``diffcore.testing.conformance``.
"""
from __future__ import annotations

import importlib
from typing import Any

import pytest


def _entry(plugin: Any) -> tuple[str, Any]:
    if isinstance(plugin, tuple):
        return plugin
    if isinstance(plugin, str):  # "diffcore_toy.plugin"
        return plugin, importlib.import_module(plugin)
    return getattr(plugin, "__name__", repr(plugin)), plugin


@pytest.fixture
def isolated_plugin_manager():
    """A factory ``make(*plugins, strict=True) -> PluginManager``; the manager it returns (built-ins +
    ``plugins``, no entry points) is the process-wide one until the test ends, then the previous one is
    restored. ``plugins`` are modules, import strings, or ``(name, module)`` pairs. ``strict`` makes a
    broken plugin raise instead of being disabled with a warning."""
    from diffcore.plugins import PluginManager, set_plugin_manager

    def make(*plugins: Any, strict: bool = True) -> PluginManager:
        manager = PluginManager(load_entrypoints=False, strict=strict, plugins=[_entry(p) for p in plugins])
        set_plugin_manager(manager)
        return manager

    previous = set_plugin_manager(PluginManager(load_entrypoints=False, strict=True))
    try:
        yield make
    finally:
        set_plugin_manager(previous)


@pytest.fixture
def diffcore_offline(monkeypatch):
    """Set ``HF_HUB_OFFLINE=1`` for the test (diffcore reads it at call time)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(params=["fast", "portable"])
def fastpath_mode(request):
    """``"fast"`` or ``"portable"``: the test body runs under ``diffcore.fastpaths.portable(...)``."""
    from diffcore import fastpaths

    with fastpaths.portable(request.param == "portable"):
        yield request.param
