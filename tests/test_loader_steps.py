"""from_pretrained's named steps (diffcore.loader.pretrained), each alone on the toy checkpoint; EngineArgs is a
frozen plain record; attention backends and cache policies belong to the pipeline that resolved them."""
from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
import torch

from diffcore.configs.engine_args import EngineArgs
from diffcore.errors import ConfigError, ParallelConfigError, RegistryError
from diffcore.loader import pretrained as steps


@pytest.fixture
def registry(toy_manager):
    return toy_manager.registry


@pytest.fixture
def source(toy_folder, registry):
    return steps.resolve_source(toy_folder, EngineArgs(), registry)


def test_resolve_source_names_the_folder_pipeline_and_config(toy_folder, registry, source):
    from toy_plugin import configs, pipelines

    assert source.folder == toy_folder and source.pipeline_cls is pipelines.ToyPipeline
    assert source.record.name == "toy-base" and type(source.config) is configs.ToyConfig
    assert source.sampling_params_cls is configs.ToySamplingParams
    assert source.wanted == ["text_encoder", "tokenizer", "transformer", "vae", "scheduler"]  # the pipeline's order
    by_alias = steps.resolve_source("toy", EngineArgs(), registry)  # the plugin's alias points at the folder
    assert by_alias.folder == toy_folder and by_alias.model == "toy"
    with pytest.raises(RegistryError, match="no pipeline named 'ToyPipeline'"):
        from diffcore.plugins import PluginManager

        steps.resolve_source(toy_folder, EngineArgs(), PluginManager(load_entrypoints=False, plugins=[]).registry)


def test_check_engine_refuses_before_any_weights_are_read(source, registry, monkeypatch):
    import diffcore.loader.pretrained as module

    monkeypatch.setattr(module, "load_component", lambda *a, **k: pytest.fail("weights were read"))
    steps.check_engine(source, EngineArgs(attention_backend="toy-counting", cache="toy-cache"), registry)
    with pytest.raises(ConfigError, match="unknown attention backend 'flash9'.*toy-counting"):
        steps.check_engine(source, EngineArgs(attention_backend="flash9"), registry)
    with pytest.raises(RegistryError, match="no cache policy named 'nope'.*toy-cache"):
        steps.check_engine(source, EngineArgs(cache="nope"), registry)
    with pytest.raises(ConfigError, match="gguf names component.*text_encoder_9"):
        steps.check_engine(source, EngineArgs(gguf={"text_encoder_9": "x.gguf"}), registry)
    missing = attrs.evolve(source, index=attrs.evolve(source.index, components={
        k: v for k, v in source.index.components.items() if k != "vae"}))
    with pytest.raises(RegistryError, match="lacks required component.*vae"):
        steps.check_engine(missing, EngineArgs(), registry)


def test_parallel_layout_returns_a_new_record_and_refuses_what_cannot_run(source):
    engine = EngineArgs()
    assert steps.parallel_layout(source, engine) is engine  # one process: nothing to refine
    with pytest.raises(ParallelConfigError):
        steps.parallel_layout(source, EngineArgs(sp_degree=2))  # not launched by torchrun / no such layout


def test_choose_precision_per_component_override_and_offload(source):
    model = steps.choose_precision(source, EngineArgs())
    assert model.dtypes["vae"] == torch.float32 and model.load_device == "cpu"
    assert model.dtypes["transformer"] in (torch.bfloat16, torch.float32)  # float32 where bf16 is emulated
    assert (model.slow_bf16 is None) == (model.dtypes["transformer"] == torch.bfloat16)
    forced = steps.choose_precision(source, EngineArgs(dtype="float32", offload="model"))
    assert set(forced.dtypes.values()) == {torch.float32} and forced.load_device == "cpu"
    assert set(forced.dtypes) == set(source.wanted)


def test_load_components_then_place_weights(source, registry):
    engine = EngineArgs(dtype="float32", offload="model")
    placement = steps.choose_precision(source, engine)
    components = steps.load_components(source, engine, placement, registry)
    assert set(components) == set(source.wanted)
    assert components["transformer"].dtype == torch.float32
    assert all(p.device.type == "cpu" for p in components["transformer"].parameters())
    hooks = steps.place_weights(components, source, engine)
    assert set(hooks) >= {"model"}  # offload attaches its hooks; the pipeline owns them
    assert steps.place_weights(components, source, EngineArgs()) is None
    pipeline = source.pipeline_cls(components, source.config, engine, components_checked=True, registry=registry,
                                   offload_hooks=hooks)
    assert pipeline.offload_hooks is hooks and pipeline.cache_policy is None and pipeline.attention_backend is None


def test_engine_args_is_a_frozen_plain_record():
    engine = EngineArgs(cache="fbcache")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        engine.device = "cuda"
    assert "cache_policy" not in attrs.fields_dict(EngineArgs) and not hasattr(engine, "step_cache_factory")
    code = ("import sys, diffcore.configs.engine_args as e; e.EngineArgs(cache='fbcache'); "
            "print(sorted(m for m in sys.modules if m in ('diffcore.plugins', 'diffcore.registry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # EngineArgs knows no plugin manager


def test_backends_and_policies_are_the_pipelines_not_module_globals(toy_folder, toy_manager, toy_gen):
    from diffcore import DiffGenerator
    from diffcore.models import attention
    from toy_plugin import model

    assert "toy-counting" not in attention._BACKENDS  # building a registry copies nothing into the module
    gen = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                        attention_backend="toy-counting", cache="toy-cache")
    assert gen.pipeline.attention_backend.name == "toy-counting"
    assert gen.pipeline.attention_backend.fn is model.counting_attention
    assert gen.pipeline.cache_policy is model.ToyStepCache and toy_gen.pipeline.cache_policy is None
    assert "toy-counting" not in attention._BACKENDS
    with pytest.raises(ConfigError, match="unknown attention backend 'toy-counting'"):
        attention.resolve_backend("toy-counting")  # without the toy plugin's registry it does not exist
    seen = []
    toy_gen.generate(prompt="x", num_inference_steps=1, output_type="latent",
                     callback=lambda *a: seen.append(attention.get_backend()))
    gen.generate(prompt="x", num_inference_steps=1, output_type="latent",
                 callback=lambda *a: seen.append(attention.get_backend()))
    assert seen == ["sdpa", "toy-counting"]
