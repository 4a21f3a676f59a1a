"""Plugins cannot silently replace built-ins or end the host program (issue 30 item 9)."""
from __future__ import annotations

import pytest

from diffcore.cli import main
from diffcore.errors import PluginError
from diffcore.plugins import PluginManager
from diffcore.records import AttentionBackendRegistration, CachePolicyRegistration, StageRegistration


def _errors(manager) -> dict[str, str]:
    return {e.plugin: e.error for e in manager.errors}


@pytest.mark.parametrize("record,what", [
    (AttentionBackendRegistration("sdpa", "builtins:print"), "attention backend 'sdpa'"),
    (AttentionBackendRegistration("math", "builtins:print"), "attention backend 'math'"),
    (CachePolicyRegistration("fbcache", "builtins:object"), "cache policy 'fbcache'"),
    (StageRegistration("DenoisingStage", "builtins:object"), "stage 'DenoisingStage'"),
], ids=["sdpa", "math", "fbcache", "stage"])
def test_a_plugin_claiming_a_built_in_name_is_a_conflict(make_plugin, toy_gen, record, what):
    from diffcore.models import attention

    kind = {AttentionBackendRegistration: "register_attention_backends", CachePolicyRegistration:
            "register_cache_policies", StageRegistration: "register_stages"}[type(record)]
    before = toy_gen.generate(prompt="a cat", height=32, width=32, num_inference_steps=2, output_type="np").output
    rogue = make_plugin("rogue", **{kind: lambda: [record]})
    manager = PluginManager(load_entrypoints=False, plugins=[("rogue", rogue)])
    with pytest.warns(RuntimeWarning, match="rogue"):
        reg = manager.registry
    assert f"conflicting {what}" in _errors(manager)["rogue"] and "rogue" in manager.disabled
    assert reg.origin(*{"register_attention_backends": ("attention_backends",), "register_cache_policies":
                        ("cache_policies",), "register_stages": ("stages",)}[kind], record.name).plugin == "diffcore"
    assert attention.available_backends() and attention._BACKENDS["sdpa"] is not print
    after = toy_gen.generate(prompt="a cat", height=32, width=32, num_inference_steps=2, output_type="np").output
    assert (after == before).all()  # the built-in backend still runs every picture


@pytest.mark.parametrize("raise_", ["raise SystemExit(3)", "import sys; sys.exit('bye')", "raise KeyboardInterrupt"])
def test_a_plugin_that_exits_at_import_is_that_plugins_error(make_dist, global_manager, capsys, raise_):
    make_dist("exiting-plugin", "dc_exiting", raise_ + "\n", ep_name="exiting")
    assert main(["plugins"]) == 0  # the other plugins are still listed
    out = capsys.readouterr().out
    assert "ERROR exiting: import of 'dc_exiting' failed:" in out
    assert ("SystemExit" in out or "KeyboardInterrupt" in out) and "flux" in out


def test_strict_mode_is_one_clear_line_and_exit_2(make_dist, global_manager, capsys, monkeypatch):
    make_dist("exiting-plugin", "dc_exiting", "raise SystemExit(3)\n", ep_name="exiting")
    monkeypatch.setenv("DIFFCORE_STRICT_PLUGINS", "1")
    with pytest.warns(RuntimeWarning):
        assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: plugin 'exiting': import of 'dc_exiting' failed")
    assert "Traceback" not in err


def test_a_hook_that_exits_costs_only_its_plugin(make_plugin):
    def bad():
        raise SystemExit(1)

    rogue = make_plugin("rogue", register_cache_policies=bad)
    manager = PluginManager(load_entrypoints=False, plugins=[("rogue", rogue)])
    with pytest.warns(RuntimeWarning, match="rogue"):
        assert "fbcache" in manager.registry.tables["cache_policies"]
    assert "SystemExit" in _errors(manager)["rogue"]
    with pytest.raises(PluginError):
        PluginManager(load_entrypoints=False, strict=True, plugins=[("rogue", rogue)]).registry
