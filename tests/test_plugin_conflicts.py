"""Plugin conflicts: the plugin that was there first keeps working; the newcomer is disabled whole.

Real entry points of throwaway distributions (``make_dist``) beside the installed diffcore plugins.
"""
from __future__ import annotations

import pytest

from diffcore import DiffGenerator
from diffcore.errors import PluginError
from diffcore.plugins import PluginManager
from diffcore.records import ConfigRegistration, ModuleRegistration, PipelineRegistration

# A second distribution serving FluxPipeline, with a module and an alias of its own.
FLUX_FORK = """
from diffcore.hookspecs import hookimpl
from diffcore.records import ConfigRegistration, ModuleRegistration, PipelineRegistration

@hookimpl
def register_pipelines():
    return [PipelineRegistration("FluxPipeline", "builtins:object")]

@hookimpl
def register_modules():
    return [ModuleRegistration("ForkTransformer", "builtins:object")]

@hookimpl
def register_configs():
    return [ConfigRegistration("fork", "FluxPipeline", "builtins:object", "builtins:object", aliases=["fork"])]
"""

THROWAWAY = """
from diffcore.hookspecs import hookimpl
from diffcore.records import ModuleRegistration, PipelineRegistration

@hookimpl
def register_pipelines():
    return [PipelineRegistration("ThrowawayPipeline", "builtins:object")]

@hookimpl
def register_modules():
    return [ModuleRegistration("{module}", "builtins:object")]
"""


def _errors(manager) -> dict[str, str]:
    return {e.plugin: e.error for e in manager.errors}


def _plugin_of(reg, kind: str, name: str):
    return reg.origin(kind, name).distribution if name in reg.tables[kind] else None


def test_second_flux_distribution_is_disabled_whole_and_flux_keeps_working(make_dist, global_manager, capsys):
    """The issue's case: another distribution registering FluxPipeline. diffcore-flux (and the demo model,
    which needs it) keep working; none of the newcomer's records is registered; both are reported."""
    make_dist("zz-flux-fork", "dc_flux_fork", FLUX_FORK, ep_name="fork")  # on sys.path before diffcore-flux
    manager = PluginManager()
    with pytest.warns(RuntimeWarning, match="fork"):
        reg = manager.registry
    message = _errors(manager)["fork"]
    assert "conflicting pipeline 'FluxPipeline'" in message
    assert "diffcore-flux" in message and "zz-flux-fork" in message and "disabled" in message
    assert reg.origin("pipelines", "FluxPipeline").distribution == "diffcore-flux"
    assert "ForkTransformer" not in reg.names("modules")  # withdrawn, though it conflicted with nothing
    assert "fork" not in reg.tables["configs"] and reg.config_for_alias("fork") is None
    assert manager.disabled.keys() == {"fork"} and "fork" not in manager.admitted
    gen = DiffGenerator.from_pretrained("demo", dtype="float32", progress=False, plugin_manager=manager)
    out = gen.generate(prompt="a red circle", height=32, width=32, num_inference_steps=1, output_type="np").output
    assert out.shape == (1, 32, 32, 3)
    global_manager(manager)
    from diffcore.cli import main

    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("fork ") and "DISABLED" in line for line in lines)
    assert not any(line.startswith("flux ") and "DISABLED" in line for line in lines)


def test_conflicts_are_decided_by_distribution_name_not_path_order(make_dist):
    # site "a" is prepended last, so it comes first on sys.path: diffcore-bbb's entry point is found first
    make_dist("diffcore-aaa", "dc_aaa", THROWAWAY.format(module="AaaModel"), ep_name="aaa", site="b")
    make_dist("diffcore-bbb", "dc_bbb", THROWAWAY.format(module="BbbModel"), ep_name="bbb", site="a")
    manager = PluginManager()
    assert list(manager.plugins).index("bbb") < list(manager.plugins).index("aaa")
    with pytest.warns(RuntimeWarning, match="bbb"):
        reg = manager.registry
    assert _plugin_of(reg, "pipelines", "ThrowawayPipeline") == "diffcore-aaa"
    assert _plugin_of(reg, "modules", "AaaModel") == "diffcore-aaa" and "BbbModel" not in reg.names("modules")
    assert "aaa" not in _errors(manager)
    assert "diffcore-aaa" in _errors(manager)["bbb"] and "diffcore-bbb" in _errors(manager)["bbb"]


def test_already_admitted_plugin_keeps_its_names_when_a_newcomer_arrives(make_plugin):
    zzz = make_plugin("zzz", register_pipelines=lambda: [PipelineRegistration("SharedPipeline", "builtins:object")])
    aaa = make_plugin("aaa", register_pipelines=lambda: [PipelineRegistration("SharedPipeline", "builtins:list")],
                      register_modules=lambda: [ModuleRegistration("AaaModel", "builtins:object")])
    manager = PluginManager(load_entrypoints=False, plugins=[("zzz", zzz)])
    assert manager.registry.origin("pipelines", "SharedPipeline").plugin == "zzz"
    manager.register(aaa, "aaa")  # sorts before zzz by name, but zzz was serving already
    with pytest.warns(RuntimeWarning, match="aaa"):
        reg = manager.registry
    assert reg.origin("pipelines", "SharedPipeline").plugin == "zzz" and "AaaModel" not in reg.names("modules")
    assert manager.admitted[:1] == ["diffcore"] and "zzz" in manager.admitted and "aaa" not in manager.admitted


def _config(name="fork-config", pipeline="FluxPipeline", **kw):
    return ConfigRegistration(name, pipeline, "builtins:object", "builtins:object", **kw)


@pytest.mark.parametrize("record,what", [
    (_config(aliases=["demo"]), "alias 'demo'"),  # the demo plugin's alias (silently dead before)
    (_config(pipeline="FluxPipeline", hf_ids=["black-forest-labs/FLUX.1-dev"]), "HF id 'black-forest-labs/FLUX.1-dev'"),
    (_config(name="flux-dev"), "config 'flux-dev'"),
], ids=["alias", "hf-id", "config-name"])
def test_alias_hf_id_and_config_name_conflicts(make_plugin, record, what):
    fork = make_plugin("fork", register_configs=lambda: [record],
                       register_modules=lambda: [ModuleRegistration("ForkModel", "builtins:object")])
    manager = PluginManager(plugins=[("fork", fork)])  # the installed plugins, then this one
    with pytest.warns(RuntimeWarning, match="fork"):
        reg = manager.registry
    assert f"conflicting {what}" in _errors(manager)["fork"]
    assert "ForkModel" not in reg.names("modules") and "fork-config" not in reg.tables["configs"]
    assert reg.config_for_alias("demo").name == "demo"
    assert reg.tables["configs"]["flux-dev"].distribution == "diffcore-flux"


def test_same_hf_id_for_two_pipelines_is_not_a_conflict(make_plugin):
    other = make_plugin("other", register_configs=lambda: [
        _config(pipeline="OtherPipeline", hf_ids=["black-forest-labs/FLUX.1-dev"])])
    manager = PluginManager(plugins=[("other", other)])
    assert "fork-config" in manager.registry.tables["configs"] and "other" not in _errors(manager)


def test_a_plugin_claiming_a_name_twice_is_disabled(make_plugin):
    twice = make_plugin("twice", register_configs=lambda: [_config("one", "XPipeline", aliases=["x"]),
                                                           _config("two", "XPipeline", aliases=["x"])])
    manager = PluginManager(load_entrypoints=False, plugins=[("twice", twice)])
    with pytest.warns(RuntimeWarning, match="already registered by itself"):
        assert manager.registry.names("configs") == []


def test_conflict_is_an_error_in_strict_mode(make_plugin, monkeypatch):
    rogue = make_plugin("rogue", register_modules=lambda: [ModuleRegistration("AutoencoderKL", "builtins:object")])
    monkeypatch.setenv("DIFFCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="conflicting module 'AutoencoderKL'"), pytest.warns(RuntimeWarning):
        PluginManager(load_entrypoints=False, plugins=[("rogue", rogue)]).registry


def test_detector_that_raises_is_recorded_and_selection_goes_on(make_plugin, toy_module, toy_folder, monkeypatch):
    def broken_detector(model_index, folder):
        raise ZeroDivisionError("detector bug")

    bad = make_plugin("bad", register_configs=lambda: [
        ConfigRegistration("bad-toy", "ToyPipeline", "builtins:object", "builtins:object", detector=broken_detector)])
    manager = PluginManager(load_entrypoints=False, plugins=[("toy", toy_module), ("bad", bad)])
    with pytest.warns(RuntimeWarning, match="bad.*detector of config 'bad-toy' raised ZeroDivisionError"):
        gen = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=manager)
    from toy_plugin.configs import ToyConfig

    assert type(gen.config) is ToyConfig  # the toy plugin's default config served the folder
    assert "detector bug" in _errors(manager)["bad"] and "bad" in manager.admitted  # recorded, not disabled
    monkeypatch.setenv("DIFFCORE_STRICT_PLUGINS", "1")
    strict = PluginManager(load_entrypoints=False, plugins=[("toy", toy_module), ("bad", bad)])
    with pytest.raises(PluginError, match="detector bug"), pytest.warns(RuntimeWarning):
        DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=strict)


def test_allow_list_naming_a_missing_plugin_warns_with_the_installed_names(make_dist, monkeypatch):
    make_dist("diffcore-good", "dc_good_allow", THROWAWAY.format(module="GoodModel"), ep_name="good")
    monkeypatch.setenv("DIFFCORE_PLUGINS", "good, qwne")
    with pytest.warns(RuntimeWarning, match=r"DIFFCORE_PLUGINS names 'qwne', which is not installed") as record:
        manager = PluginManager()
    message = str(record[0].message)
    assert "installed plugins:" in message and "good" in message and "qwen" in message
    assert set(manager.plugins) == {"diffcore", "good"}
    monkeypatch.setenv("DIFFCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="qwne"), pytest.warns(RuntimeWarning):
        PluginManager()
