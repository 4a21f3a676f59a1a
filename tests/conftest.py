"""Shared fixtures for diffcore's core tests: the toy plugin, its checkpoint, throwaway distributions."""
from __future__ import annotations

import importlib
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the toy plugin package lives beside this file
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_PLUGIN_ENV = ("DIFFCORE_STRICT_PLUGINS", "DIFFCORE_PLUGINS", "DIFFCORE_TRACE_PLUGINS")


@pytest.fixture(autouse=True)
def _plugin_env(monkeypatch):
    """Each test starts with the default plugin policy, whatever the caller's environment says."""
    for name in _PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _serve_state_home(tmp_path_factory):
    """`diffcore serve` processes started by tests keep their state folders (default: one per port under
    $DIFFCORE_STATE_HOME) in this session's temporary folder, not in the user's cache."""
    previous = os.environ.get("DIFFCORE_STATE_HOME")
    os.environ["DIFFCORE_STATE_HOME"] = str(tmp_path_factory.mktemp("serve-state"))
    yield
    if previous is None:
        os.environ.pop("DIFFCORE_STATE_HOME", None)
    else:
        os.environ["DIFFCORE_STATE_HOME"] = previous


@pytest.fixture
def machine_fastpaths(monkeypatch):
    """The fast paths this machine allows, whatever an outer ``DIFFCORE_PORTABLE`` says: for the tests
    that check which path is chosen (they would assert the opposite of a forced portable run)."""
    from diffcore import fastpaths

    monkeypatch.delenv(fastpaths.ENV, raising=False)
    fastpaths.reload_environment()
    fastpaths.reset()
    yield
    monkeypatch.undo()
    fastpaths.reload_environment()
    fastpaths.reset()


@pytest.fixture(scope="session")
def make_plugin():
    """``make_plugin(name, register_pipelines=fn, ...)``: an in-memory plugin module whose functions are
    marked as diffcore hook implementations (for managers built with ``plugins=[(name, module)]``)."""
    from diffcore.hookspecs import hookimpl

    def make(name: str, **hooks) -> types.ModuleType:
        module = types.ModuleType(name)
        for hook, fn in hooks.items():
            setattr(module, hook, hookimpl(fn))
        return module

    return make


@pytest.fixture(scope="session")
def toy_module():
    return importlib.import_module("toy_plugin.plugin")


@pytest.fixture(scope="session")
def toy_manager(toy_module):
    """A manager that knows only diffcore's built-ins and the toy plugin (no installed entry points)."""
    from diffcore.plugins import PluginManager

    return PluginManager(load_entrypoints=False, plugins=[("toy", toy_module)])


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory):
    from toy_plugin import checkpoint

    folder = checkpoint.write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "toy")
    checkpoint.DEFAULT_FOLDER = folder  # where the "toy" alias points
    return folder


@pytest.fixture(scope="session")
def toy_gen(toy_folder, toy_manager):
    """The toy model loaded in fp32 (shared: tests must not mutate it, or must restore what they change)."""
    from diffcore import DiffGenerator

    return DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager)


@pytest.fixture
def global_manager():
    """Install a manager as the process-wide one for the test (the CLI uses that one); restored after."""
    from diffcore import plugins

    previous = plugins.set_plugin_manager(None)
    yield plugins.set_plugin_manager
    plugins.set_plugin_manager(previous)


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """``make_dist(dist, module, source, ...)`` installs a throwaway distribution with a real ``diffcore``
    entry point into a temporary site directory on sys.path; returns that directory.

    ``site`` picks the directory (distributions found earlier on sys.path win); ``entry_point`` overrides
    the entry point's value (default: the module written beside the dist-info).
    """
    written: list[str] = []
    sites: dict[str, Path] = {}

    def make(dist: str, module: str, source: str = "", *, ep_name: str | None = None, version: str = "0.1",
             requires: tuple[str, ...] = (), entry_point: str | None = None, site: str = "site") -> Path:
        if site not in sites:
            sites[site] = tmp_path / site
            sites[site].mkdir()
            monkeypatch.syspath_prepend(str(sites[site]))
        root = sites[site]
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        meta = ["Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(meta) + "\n")
        (info / "entry_points.txt").write_text(f"[diffcore]\n{ep_name or module} = {entry_point or module}\n")
        if source:
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            written.append(module)
        importlib.invalidate_caches()
        return root

    yield make
    for module in written:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
