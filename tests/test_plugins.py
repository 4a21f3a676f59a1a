"""Plugin lifecycle: discovery through real entry points, isolation of broken plugins, conflicts, the
registry's lookups and model selection, and torch-free entry-point modules."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.errors import PluginError, RegistryError
from diffcore.plugins import PluginManager
from diffcore.records import ModuleRegistration, PipelineRegistration

REPO = Path(__file__).resolve().parents[1]

GOOD = """
from diffcore.hookspecs import hookimpl
from diffcore.records import PipelineRegistration

class ThrowawayPipeline:
    pass

@hookimpl
def register_pipelines():
    return [PipelineRegistration("ThrowawayPipeline", __name__ + ":ThrowawayPipeline")]
"""

BROKEN_IMPORT = """
raise RuntimeError("boom at import")
"""

HOOK_RAISES = """
from diffcore.hookspecs import hookimpl
from diffcore.records import ModuleRegistration

@hookimpl
def register_pipelines():
    raise ValueError("hook exploded")

@hookimpl
def register_modules():
    return [ModuleRegistration("SurvivingModel", "builtins:object")]
"""

WRONG_RECORD = """
from diffcore.hookspecs import hookimpl
from diffcore.records import ModuleRegistration

@hookimpl
def register_pipelines():
    return [ModuleRegistration("NotAPipeline", "builtins:object")]
"""


def _errors(manager) -> dict[str, str]:
    return {e.plugin: e.error for e in manager.errors}


# ---------------------------------------------------------------------------- toy plugin, end to end
def test_toy_plugin_generates_end_to_end(toy_gen):
    """The toy family (its own DiT + core VAE, scheduler, CLIP, stages) generates through the public API."""
    run = lambda **kw: toy_gen.generate(**{"prompt": "a red circle", "height": 32, "width": 48, "seed": 1,
                                           "output_type": "np", **kw}).output
    out = run()
    assert out.shape == (1, 32, 48, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0.05  # a picture, not a constant
    np.testing.assert_array_equal(run(), out)  # same seed => same output, bit for bit
    assert np.abs(run(seed=2) - out).max() > 0.05
    assert np.abs(run(prompt="a blue square") - out).max() > 0.01  # the prompt reaches the transformer
    assert np.abs(run(guidance_scale=1.0) - out).max() > 0.01  # CFG on (3.0, the default) vs off
    image = toy_gen.generate(prompt="a red circle", height=32, width=48, seed=1).images[0]
    assert image.size == (48, 32) and image.mode == "RGB"


def test_registry_stamps_each_record_with_its_origin(toy_manager):
    reg = toy_manager.registry
    origin = reg.origin("pipelines", "ToyPipeline")
    assert origin.plugin == "toy" and origin.record.description == "toy text-to-image"
    builtin = reg.origin("modules", "AutoencoderKL")
    assert (builtin.plugin, builtin.distribution) == ("diffcore", "diffcore")
    from toy_plugin import model, pipelines

    assert reg.get("pipelines", "ToyPipeline") is pipelines.ToyPipeline
    assert reg.get("modules", "ToyTransformer2DModel") is model.ToyTransformer2DModel
    assert reg.get("schedulers", "ToyFlowScheduler") is model.ToyFlowScheduler
    assert reg.get("stages", "ToyNoopStage") is model.ToyNoopStage
    assert reg.get("cache_policies", "toy-cache") is model.ToyStepCache
    assert "DenoisingStage" in reg.names("stages")  # built-ins come through the same hooks
    assert "ToyFlowScheduler" in reg.scheduler_classes() and "FlowMatchEulerDiscreteScheduler" in reg.scheduler_classes()


def test_attention_backend_and_cache_policy_from_a_plugin(toy_folder, toy_manager, toy_gen):
    from diffcore.models import attention
    from toy_plugin import model

    before = model.ATTENTION_CALLS[0]
    gen = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                        attention_backend="toy-counting", cache="toy-cache")
    result = gen.generate(prompt="a cat", num_inference_steps=4, seed=0, output_type="np")
    out = result.output
    assert attention.get_backend() == "sdpa"  # the pipeline's backend applied inside its forward only
    # 4 steps x (cond + uncond) = 8 predictions, 4 of them from the cache; each transformer call attends
    # twice (self + cross), and the VAE's mid-block attention goes through the same dispatch once
    assert gen.pipeline.cache_policy is model.ToyStepCache  # resolved by the pipeline, from its registry
    assert result.cache_stats == {"computed": 4, "skipped": 4}
    assert model.ATTENTION_CALLS[0] - before == 2 * 4 + 1
    plain = toy_gen.generate(prompt="a cat", num_inference_steps=4, seed=0, output_type="np").output
    assert 0 < np.abs(out - plain).max()  # the cache really replaced predictions


def test_trace_switch_logs_hook_calls(monkeypatch, caplog, toy_module):
    monkeypatch.setenv("DIFFCORE_TRACE_PLUGINS", "1")
    manager = PluginManager(load_entrypoints=False, plugins=[("toy", toy_module)])
    with caplog.at_level("WARNING", logger="diffcore.plugins"):
        manager.registry
    assert "register_pipelines" in caplog.text


# ------------------------------------------------------------------ real entry points, throwaway dists
def test_entry_point_of_a_throwaway_distribution_is_discovered(make_dist):
    make_dist("diffcore-throwaway", "dc_throwaway_good", GOOD, ep_name="throwaway", version="0.3.1")
    manager = PluginManager()
    info = manager.plugins["throwaway"]
    assert (info.name, info.distribution, info.version) == ("throwaway", "diffcore-throwaway", "0.3.1")
    origin = manager.registry.origin("pipelines", "ThrowawayPipeline")
    assert (origin.plugin, origin.distribution, origin.version) == ("throwaway", "diffcore-throwaway", "0.3.1")
    assert manager.registry.get("pipelines", "ThrowawayPipeline").__module__ == "dc_throwaway_good"
    assert "diffcore" in manager.plugins  # the built-ins are there too
    assert "throwaway" not in _errors(manager)


def test_toy_plugin_through_a_real_entry_point_generates(make_dist, toy_folder, monkeypatch):
    make_dist("diffcore-toy", "toy_plugin", ep_name="toy", entry_point="toy_plugin.plugin")
    monkeypatch.setenv("DIFFCORE_PLUGINS", "toy")  # the allow-list: only the toy plugin is loaded
    manager = PluginManager()
    assert set(manager.plugins) == {"diffcore", "toy"} and manager.plugins["toy"].distribution == "diffcore-toy"
    gen = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=manager)
    out = gen.generate(prompt="a cat", seed=0, output_type="np").output
    assert out.shape == (1, 32, 32, 3)
    assert manager.registry.origin("modules", "ToyTransformer2DModel").distribution == "diffcore-toy"


def test_plugin_failing_at_import_is_isolated(make_dist):
    make_dist("diffcore-good", "dc_good_a", GOOD, ep_name="good")
    make_dist("diffcore-broken", "dc_broken_a", BROKEN_IMPORT, ep_name="broken")
    with pytest.warns(RuntimeWarning, match="broken.*boom at import"):
        manager = PluginManager()
    assert "broken" not in manager.plugins
    assert "RuntimeError: boom at import" in _errors(manager)["broken"]
    assert manager.registry.get("pipelines", "ThrowawayPipeline").__module__ == "dc_good_a"


def test_strict_mode_reraises_as_plugin_error(make_dist, monkeypatch):
    make_dist("diffcore-broken", "dc_broken_b", BROKEN_IMPORT, ep_name="broken")
    monkeypatch.setenv("DIFFCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken.*boom at import") as exc_info, pytest.warns(RuntimeWarning):
        PluginManager()
    assert isinstance(exc_info.value.__cause__, RuntimeError)


def test_allow_list_skips_other_plugins(make_dist, monkeypatch):
    make_dist("diffcore-good", "dc_good_c", GOOD, ep_name="good")
    make_dist("diffcore-broken", "dc_broken_c", BROKEN_IMPORT, ep_name="broken")
    monkeypatch.setenv("DIFFCORE_PLUGINS", "good")
    manager = PluginManager()
    assert set(manager.plugins) == {"diffcore", "good"} and manager.errors == []
    assert "dc_broken_c" not in sys.modules


def test_plugin_whose_hook_raises_is_isolated(make_dist, monkeypatch):
    make_dist("diffcore-good", "dc_good_d", GOOD, ep_name="good")
    make_dist("diffcore-hookfail", "dc_hookfail_d", HOOK_RAISES, ep_name="hookfail")
    manager = PluginManager()
    with pytest.warns(RuntimeWarning, match="hookfail"):
        reg = manager.registry
    assert "hook register_pipelines raised ValueError: hook exploded" in _errors(manager)["hookfail"]
    assert reg.get("pipelines", "ThrowawayPipeline").__module__ == "dc_good_d"
    assert reg.origin("modules", "SurvivingModel").plugin == "hookfail"  # its other hooks still count
    monkeypatch.setenv("DIFFCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="hook exploded"), pytest.warns(RuntimeWarning):
        PluginManager().registry


def test_wrong_record_type_is_reported(make_dist, make_plugin):
    make_dist("diffcore-wrong", "dc_wrong_e", WRONG_RECORD, ep_name="wrong")
    manager = PluginManager()
    with pytest.warns(RuntimeWarning, match="wrong"):
        reg = manager.registry
    assert "register_pipelines returned ModuleRegistration, expected PipelineRegistration" in _errors(manager)["wrong"]
    assert "NotAPipeline" not in reg.names("pipelines") and "NotAPipeline" not in reg.names("modules")
    # a bare record instead of a list
    single = make_plugin("single", register_pipelines=lambda: PipelineRegistration("X", "builtins:object"))
    manager = PluginManager(load_entrypoints=False, plugins=[("single", single)])
    with pytest.warns(RuntimeWarning):
        manager.registry
    assert "must return a list of records, got PipelineRegistration" in _errors(manager)["single"]


def test_misnamed_hook_is_reported(make_plugin, toy_module):
    typo = make_plugin("typo", register_pipeline=lambda: [])
    with pytest.warns(RuntimeWarning, match="typo"):
        manager = PluginManager(load_entrypoints=False, plugins=[("typo", typo), ("toy", toy_module)])
    assert "register_pipeline" in _errors(manager)["typo"] and "typo" not in manager.plugins
    assert manager.registry.names("pipelines") == ["ToyPipeline"]


def test_incompatible_diffcore_requirement_is_refused(make_dist):
    make_dist("diffcore-old", "dc_old_f", GOOD, ep_name="old", version="0.0.9", requires=("diffcore<0.1",))
    with pytest.warns(RuntimeWarning, match="old"):
        manager = PluginManager()
    message = _errors(manager)["old"]
    assert "diffcore-old 0.0.9 requires diffcore<0.1" in message and "diffcore 0.1.0 is installed" in message
    assert "old" not in manager.plugins and "dc_old_f" not in sys.modules  # refused before importing it
    # a requirement behind an extra does not apply
    make_dist("diffcore-extra", "dc_extra_f", GOOD.replace("Throwaway", "Extra"), ep_name="extra",
              requires=('diffcore<0.1; extra == "dev"',))
    with pytest.warns(RuntimeWarning):
        manager = PluginManager()
    assert "extra" in manager.plugins and "extra" not in _errors(manager)


def test_conflicting_names_name_both_distributions(make_dist):
    # site "a" is prepended last, so it comes first on sys.path: its plugin registers first
    make_dist("diffcore-second", "dc_second_g", GOOD, ep_name="second", site="b")
    make_dist("diffcore-first", "dc_first_g", GOOD, ep_name="first", site="a")
    manager = PluginManager()
    with pytest.warns(RuntimeWarning, match="second"):
        reg = manager.registry
    message = _errors(manager)["second"]
    assert "conflicting pipeline 'ThrowawayPipeline'" in message
    assert "diffcore-first" in message and "diffcore-second" in message
    assert reg.origin("pipelines", "ThrowawayPipeline").distribution == "diffcore-first"
    assert reg.get("pipelines", "ThrowawayPipeline").__module__ == "dc_first_g"


def test_plugin_cannot_take_over_a_builtin_name(make_plugin, toy_module):
    """Built-ins register first, so a plugin reusing their name is the one refused."""
    rogue = make_plugin("rogue", register_modules=lambda: [ModuleRegistration("AutoencoderKL", "builtins:object")])
    manager = PluginManager(load_entrypoints=False, plugins=[("rogue", rogue), ("toy", toy_module)])
    with pytest.warns(RuntimeWarning, match="rogue"):
        reg = manager.registry
    assert "conflicting module 'AutoencoderKL': already registered by plugin 'diffcore'" in _errors(manager)["rogue"]
    assert reg.origin("modules", "AutoencoderKL").plugin == "diffcore"
    assert reg.get("modules", "AutoencoderKL").__module__ == "diffcore.models.autoencoder_kl"


# --------------------------------------------------------------------------------------- registry
def _index_folder(tmp_path, class_name: str, **extra) -> Path:
    folder = tmp_path / class_name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, **extra}))
    return folder


def test_unknown_pipeline_lists_installed_and_hints_plugin(tmp_path, toy_manager):
    folder = _index_folder(tmp_path, "QwenImagePipeline", transformer=["diffusers", "QwenImageTransformer2DModel"])
    with pytest.raises(RegistryError) as exc_info:
        DiffGenerator.from_pretrained(folder, plugin_manager=toy_manager)
    message = str(exc_info.value)
    assert "'QwenImagePipeline'" in message and "installed: ToyPipeline" in message
    assert "pip install diffcore-qwen" in message
    folder = _index_folder(tmp_path, "MysteryPipeline")
    with pytest.raises(RegistryError, match="installed: ToyPipeline") as exc_info:
        DiffGenerator.from_pretrained(folder, plugin_manager=toy_manager)
    assert "by convention: pip install diffcore-mystery" in str(exc_info.value)  # named after the class, not a table
    with pytest.raises(RegistryError, match=r"no module named 'Nope'.*AutoencoderKL.*ToyTransformer2DModel"):
        toy_manager.registry.get("modules", "Nope")


def test_alias_resolves_to_its_source(toy_folder, toy_manager):
    from toy_plugin.configs import ToyConfig, ToySamplingParams

    gen = DiffGenerator.from_pretrained("toy", dtype="float32", progress=False, plugin_manager=toy_manager)
    assert gen.folder == Path(toy_folder).resolve()
    assert type(gen.config) is ToyConfig and gen.sampling_params_cls is ToySamplingParams


def test_select_config_by_hub_id_detector_and_default(tmp_path, toy_manager):
    from diffcore.loader import read_model_index

    reg = toy_manager.registry
    plain = read_model_index(_index_folder(tmp_path, "ToyPipeline"))
    assert reg.select_config("diffcore-test/toy-large", plain, plain.folder).name == "toy-large"
    assert reg.select_config("toy", plain, plain.folder).name == "toy-base"  # an alias
    assert reg.select_config(str(plain.folder), plain, plain.folder).name == "toy-base"  # the default
    named = tmp_path / "named"
    named.mkdir()
    (named / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline",
                                                        "_name_or_path": "diffcore-test/toy-large"}))
    assert reg.select_config(str(named), read_model_index(named), named).name == "toy-large"
    large = tmp_path / "large"
    large.mkdir()
    (large / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline", "toy_variant": "large"}))
    assert reg.select_config(str(large), read_model_index(large), large).name == "toy-large"  # the detector


def test_detected_variant_gets_its_configs_when_loaded(tmp_path, toy_folder, toy_manager):
    from toy_plugin.configs import ToyLargeConfig, ToyLargeSamplingParams

    folder = tmp_path / "large"
    shutil.copytree(toy_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "toy_variant": "large"}))
    gen = DiffGenerator.from_pretrained(folder, progress=False, plugin_manager=toy_manager)
    assert type(gen.config) is ToyLargeConfig and gen.sampling_params_cls is ToyLargeSamplingParams
    assert gen.components["transformer"].dtype == torch.float32  # ToyLargeConfig's precision, not ToyConfig's
    result = gen.generate(prompt="a cat", output_type="latent")
    assert result.output is None and result.latents.shape == (1, 64, 16)


def test_pipeline_without_config_is_reported(tmp_path, make_plugin):
    lonely = make_plugin("lonely", register_pipelines=lambda: [PipelineRegistration("LonelyPipeline", "builtins:object")])
    manager = PluginManager(load_entrypoints=False, plugins=[("lonely", lonely)])
    from diffcore.loader import read_model_index

    index = read_model_index(_index_folder(tmp_path, "LonelyPipeline"))
    with pytest.raises(RegistryError, match="'LonelyPipeline' is installed but no plugin registered a config"):
        manager.registry.select_config("x", index, index.folder)


# ---------------------------------------------------------------------------- torch-free entry points
def _real_plugin_modules() -> list[tuple[str, Path]]:
    return [(f"{p.parent.name}.plugin", p.parents[1]) for p in sorted(REPO.glob("plugins/*/diffcore_*/plugin.py"))]


@pytest.mark.parametrize("module,root", [pytest.param(m, r, id=m) for m, r in
                                         _real_plugin_modules() + [("toy_plugin.plugin", REPO / "tests")]])
def test_plugin_entry_point_module_imports_without_torch(module, root):
    code = f"import sys; import {module}; bad = [m for m in sys.modules if m.split('.')[0] == 'torch']; assert not bad, bad"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_core_hook_modules_and_plugin_discovery_import_without_torch():
    code = ("import sys; import diffcore, diffcore.hookspecs, diffcore.records; "
            "from diffcore.plugins import PluginManager; m = PluginManager(); "
            "bad = [n for n in sys.modules if n.split('.')[0] == 'torch']; assert not bad, bad; "
            "assert 'diffcore' in m.plugins")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_builtin_stage_registrations_match_the_standard_stages():
    """The built-in plugin names its stages by import string (cheap registry); they must stay in sync."""
    from diffcore.builtin import _STAGES
    from diffcore.stages import STANDARD_STAGES

    assert set(_STAGES) == set(STANDARD_STAGES)
