"""diffcore.testing for plugin authors: the pytest plugin, checkpoint writers, and conformance checks that fail
when a pipeline misbehaves (the passing side runs on real pipelines in the plugins' and the template's tests)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffcore.testing import conformance

pytest_plugins = ["pytester"]


# ---- the pytest plugin -------------------------------------------------------------------------


def test_pytest_plugin_is_registered_and_isolates(pytester):
    """A fresh pytest run gets the fixture from the pytest11 entry point; the manager it installs holds the
    built-ins plus the named plugin only, and the previous manager comes back afterwards."""
    pytester.makepyfile(test_inner="""
        import types
        from diffcore import hookimpl
        from diffcore.plugins import get_plugin_manager, set_plugin_manager
        from diffcore.records import PipelineRegistration

        SENTINEL = object()

        def test_a_set_sentinel():
            set_plugin_manager(SENTINEL)

        def test_b_isolated(isolated_plugin_manager):
            assert set(get_plugin_manager().plugins) == {"diffcore"}  # nothing installed leaks in
            plugin = types.SimpleNamespace(register_pipelines=hookimpl(
                lambda: [PipelineRegistration("XPipeline", "x:XPipeline")]))
            manager = isolated_plugin_manager(("x", plugin))
            assert get_plugin_manager() is manager and manager.registry.names("pipelines") == ["XPipeline"]

        def test_c_restored():
            from diffcore.plugins import _default
            assert _default is SENTINEL
            set_plugin_manager(None)
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


# ---- checkpoints -------------------------------------------------------------------------------


def test_write_checkpoint_round_trips_through_the_loader(tmp_path):
    from diffcore.loader import load_component, read_model_index
    from diffcore.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler
    from diffcore.testing.checkpoints import flow_match_scheduler, tiny_autoencoder_kl, write_checkpoint
    from diffcore.testing.tokenizers import tiny_t5_tokenizer
    from diffcore.models.autoencoder_kl import AutoencoderKL

    vae = tiny_autoencoder_kl(seed=3)
    folder = write_checkpoint(tmp_path / "ckpt", "SomePipeline", {
        "vae": vae, "scheduler": flow_match_scheduler(shift=2.5), "tokenizer": tiny_t5_tokenizer(), "extra": None,
    }, extra={"boundary_ratio": 0.5}, name_or_path="org/some")
    raw = json.loads((folder / "model_index.json").read_text())
    assert raw["vae"] == ["diffusers", "AutoencoderKL"] and raw["tokenizer"] == ["transformers", "T5Tokenizer"]
    assert raw["extra"] == [None, None] and raw["_name_or_path"] == "org/some"
    index = read_model_index(folder)
    assert index.extra == {"boundary_ratio": 0.5} and set(index.components) == {"vae", "scheduler", "tokenizer"}
    kw = dict(module_classes={"AutoencoderKL": AutoencoderKL},
              scheduler_classes={"FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler},
              dtype=torch.float32, device="cpu")
    loaded = load_component(folder, index.components["vae"], **kw)
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert load_component(folder, index.components["scheduler"], **kw).config["shift"] == 2.5


def test_saving_a_module_without_config_says_how_to_fix_it(tmp_path):
    from diffcore.models.base import ModelMixin
    from diffcore.testing.checkpoints import save_component

    class Net(ModelMixin):
        def __init__(self, width: int = 4):
            super().__init__()
            self.proj = torch.nn.Linear(width, width)

    with pytest.raises(ValueError, match=r"from_config"):
        save_component(Net(), tmp_path / "net")
    assert save_component(Net.from_config({"width": 2}), tmp_path / "net") == ["diffusers", "Net"]
    assert json.loads((tmp_path / "net" / "config.json").read_text())["width"] == 2


# ---- conformance checks fail on misbehaving pipelines -------------------------------------------


class FakeGenerator:
    """Just enough of a DiffGenerator: SamplingParams validation, then ``make(params)`` as the output."""

    def __init__(self, make, stages=("a", "b")):
        from diffcore.configs import PipelineConfig, SamplingParams

        self.make, self.sampling_params_cls, self.config = make, SamplingParams, PipelineConfig()
        self.pipeline = SimpleNamespace(stages=[SimpleNamespace(name=s) for s in stages])
        self.pipeline.forward = lambda req: req

    def generate(self, **kw):
        from diffcore.outputs import GenerationResult

        params = self.sampling_params_cls.from_user(**kw)
        self.pipeline.forward(params)
        out = self.make(params)
        return GenerationResult(output=out, latents=None, timings={"a": 0.1, "b": 0.1})


def _noise(p):
    return np.random.default_rng(p.seed).random((len(p.prompts), p.height, p.width, 3), dtype=np.float32)


SMALL = dict(prompt="a cat", height=8, width=8, num_inference_steps=1)


def test_conformance_passes_a_well_behaved_generator():
    gen = FakeGenerator(_noise)
    conformance.check_determinism(gen, **SMALL)
    conformance.check_output(gen, **SMALL)
    assert len(conformance.check_bad_params(gen, prompt="a cat")) == len(conformance.BAD_PARAMS)


@pytest.mark.parametrize("make,message", [
    (lambda p: np.random.default_rng().random((1, 8, 8, 3), dtype=np.float32), "twice gave different outputs"),
    (lambda p: np.full((1, 8, 8, 3), 0.5, np.float32) + np.arange(3, dtype=np.float32) / 10, "the seed does not reach"),
])
def test_determinism_check_fails(make, message):
    with pytest.raises(AssertionError, match=message):
        conformance.check_determinism(FakeGenerator(make), **SMALL)


@pytest.mark.parametrize("make,message", [
    (lambda p: _noise(p)[:, :4], "output shape"),
    (lambda p: _noise(p) * 2, "outside \\[0, 1\\]"),
    (lambda p: _noise(p).astype(np.float64), "dtype"),
    (lambda p: np.where(_noise(p) > 0.5, np.nan, 0.2).astype(np.float32), "NaN"),
    (lambda p: np.zeros((1, 8, 8, 3), np.float32), "constant"),
])
def test_output_check_fails(make, message):
    with pytest.raises(AssertionError, match=message):
        conformance.check_output(FakeGenerator(make), **SMALL)


def test_output_check_notices_a_stage_that_did_not_run():
    with pytest.raises(AssertionError, match=r"stages \['c'\] did not run"):
        conformance.check_output(FakeGenerator(_noise, stages=("a", "b", "c")), **SMALL)


def test_bad_params_check_fails_when_the_pipeline_runs_first_or_accepts():
    gen = FakeGenerator(_noise)
    with pytest.raises(AssertionError, match="was accepted"):
        conformance.check_bad_params(gen, cases=[("num_inference_steps", 3)], **SMALL)
    lazy = FakeGenerator(_noise)

    def generate(**kw):  # runs the pipeline, then validates: too late
        lazy.pipeline.forward(kw)
        return FakeGenerator.generate(lazy, **kw)

    lazy.generate = generate
    with pytest.raises(AssertionError, match="ran before the parameter was rejected"):
        conformance.check_bad_params(lazy, cases=[("num_inference_steps", 0)], prompt="a cat")


def test_dataflow_check():
    from diffcore.configs import PipelineConfig
    from diffcore.errors import PipelineDataflowError
    from diffcore.pipeline import ComposedPipelineBase
    from diffcore.stages import DecodingStage, In, InputValidationStage, LatentPreparationStage, Out, PipelineStage

    class Good(ComposedPipelineBase):
        pipeline_name = "Good"
        _required_config_modules = ("vae", "transformer")

        def create_pipeline_stages(self, engine_args):
            c = self.components
            self.add_stage("input_validation", InputValidationStage(self.config, c))
            self.add_stage("latent_preparation", LatentPreparationStage(self.config, c))
            self.add_stage("decoding", DecodingStage(self.config, c))

    assert conformance.check_dataflow(Good) == ["input_validation", "latent_preparation", "decoding"]

    class Missing(Good):
        def create_pipeline_stages(self, engine_args):
            self.add_stage("decoding", DecodingStage(self.config, self.components))

    with pytest.raises(PipelineDataflowError, match="requires 'latents'"):
        conformance.check_dataflow(Missing)

    class Typo(PipelineStage):
        inputs, outputs = (In("latents"),), (Out("latent"),)

    class WithTypo(Good):
        def create_pipeline_stages(self, engine_args):
            super().create_pipeline_stages(engine_args)
            self.add_stage("typo", Typo())

    with pytest.raises(AssertionError, match="'latent', which is not a Request field"):
        conformance.check_dataflow(WithTypo, config=PipelineConfig())

    class NoOutput(Good):
        def create_pipeline_stages(self, engine_args):
            self.add_stage("input_validation", InputValidationStage(self.config, self.components))

    with pytest.raises(AssertionError, match="produces 'output'"):
        conformance.check_dataflow(NoOutput)
