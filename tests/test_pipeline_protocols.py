"""Stage contracts (verify_input / verify_output), the build-time dataflow proof, and required components."""
from __future__ import annotations

import json
import shutil

import attrs
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.configs import PipelineConfig, SamplingParams
from diffcore.errors import ConfigError, PipelineDataflowError, RegistryError, StageVerificationError
from diffcore.pipeline import ComposedPipelineBase
from diffcore.request import Request
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingLoopStage, DenoisingStage, In, InputValidationStage,
                             Out, PipelineStage)


def _request(**fields) -> Request:
    params = SamplingParams(prompt="a cat")
    return Request(params=params, prompts=params.prompts, batch_size=1, device=torch.device("cpu"),
                   generator=torch.Generator("cpu").manual_seed(0), **fields)


class Recorder(PipelineStage):
    """A stage that records that it ran, and optionally produces its outputs."""

    def __init__(self, inputs=(), outputs=(), produce: dict | None = None, name: str | None = None):
        super().__init__(name)
        self.inputs, self.outputs, self.produce, self.ran = tuple(inputs), tuple(outputs), produce or {}, 0

    def forward(self, req):
        self.ran += 1
        for key, value in self.produce.items():
            setattr(req, key, value)
        return req


# ------------------------------------------------------------------------------ stage verification
def test_verify_input_names_stage_field_and_reason():
    stage = Recorder(inputs=[In("latents", torch.Tensor)], name="my_stage")
    with pytest.raises(StageVerificationError) as exc_info:
        stage(_request())
    err = exc_info.value
    assert (err.stage, err.field) == ("my_stage", "latents") and "missing" in err.reason
    assert "'my_stage'" in str(err) and "'latents'" in str(err)
    assert stage.ran == 0  # checked before forward
    with pytest.raises(StageVerificationError, match="expected Tensor, got list") as exc_info:
        stage(_request(latents=[1.0, 2.0]))
    assert exc_info.value.field == "latents"
    stage(_request(latents=torch.zeros(1)))
    assert stage.ran == 1


def test_optional_input_may_be_absent_but_not_mistyped():
    stage = Recorder(inputs=[In("images", list, required=False)], name="opt")
    stage(_request())
    with pytest.raises(StageVerificationError, match="expected list, got str") as exc_info:
        stage(_request(images="not-a-list"))
    assert (exc_info.value.stage, exc_info.value.field) == ("opt", "images")


def test_verify_output_catches_a_stage_that_breaks_its_contract():
    lazy = Recorder(outputs=[Out("latents", torch.Tensor)], name="lazy")
    with pytest.raises(StageVerificationError, match="required as output but missing") as exc_info:
        lazy(_request())
    assert (exc_info.value.stage, exc_info.value.field) == ("lazy", "latents") and lazy.ran == 1
    wrong = Recorder(outputs=[Out("latents", torch.Tensor)], produce={"latents": "oops"}, name="wrong")
    with pytest.raises(StageVerificationError, match="expected Tensor, got str"):
        wrong(_request())


def test_stage_call_records_its_timing():
    req = Recorder(name="timed")(_request())
    assert req.timings["timed"] >= 0.0


def test_request_has_explicit_fields_only():
    req = _request()
    with pytest.raises(AttributeError):
        req.prompt_embedings = 1  # a typo must not silently create a field


# ------------------------------------------------------------------------------ build-time dataflow
class _Exploding:
    """A component that must not be used while a pipeline is being built (reading its config is fine)."""

    config: dict = {}
    spatial_compression_ratio = temporal_compression_ratio = None  # geometry, like config: fine to read

    def __getattr__(self, name):
        raise AssertionError(f"component used during construction ({name})")

    def __call__(self, *args, **kwargs):
        raise AssertionError("component called during construction")


def _pipeline(build, modules=()):
    cls = type("ProbePipeline", (ComposedPipelineBase,), {
        "pipeline_name": "ProbePipeline", "_required_config_modules": tuple(modules),
        "create_pipeline_stages": lambda self, engine_args: build(self)})
    return cls


def test_missing_field_fails_at_construction_naming_stage_and_field():
    cfg = PipelineConfig()
    components = {"transformer": _Exploding()}
    stages = []

    def build(p):
        stages.extend([InputValidationStage(cfg, p.components), ConditioningStage(cfg, p.components)])
        p.add_stage("input_validation", stages[0])
        p.add_stage("conditioning", stages[1])

    with pytest.raises(PipelineDataflowError) as exc_info:
        _pipeline(build)(components, cfg)
    err = exc_info.value
    assert (err.pipeline, err.stage, err.field) == ("ProbePipeline", "conditioning", "prompt_embeds")
    message = str(err)
    assert "stage 'conditioning' requires 'prompt_embeds'" in message
    assert "height" in message and "prompts" in message  # what was available at that point


def test_dataflow_respects_stage_order_and_optional_inputs():
    producer = lambda: Recorder(outputs=[Out("latents", torch.Tensor)], name="producer")
    consumer = lambda: Recorder(inputs=[In("latents", torch.Tensor), In("image_latents", required=False)],
                                outputs=[Out("output", torch.Tensor)], name="consumer")

    def good(p):
        p.add_stage("producer", producer())
        p.add_stage("consumer", consumer())

    def reversed_order(p):
        p.add_stage("consumer", consumer())
        p.add_stage("producer", producer())

    pipe = _pipeline(good)({}, PipelineConfig())
    assert [s.name for s in pipe.stages] == ["producer", "consumer"]
    assert all(s.ran == 0 for s in pipe.stages)  # building runs nothing
    with pytest.raises(PipelineDataflowError, match="stage 'consumer' requires 'latents'"):
        _pipeline(reversed_order)({}, PipelineConfig())


def test_real_stage_chain_missing_a_producer():
    """A decoding stage with nothing producing latents before it: caught when the pipeline is built."""
    cfg = PipelineConfig()

    def build(p):
        p.add_stage("input_validation", InputValidationStage(cfg, p.components))
        p.add_stage("decoding", DecodingStage(cfg, p.components))

    with pytest.raises(PipelineDataflowError, match="stage 'decoding' requires 'latents'"):
        _pipeline(build)({"vae": _Exploding()}, cfg)


def test_duplicate_and_unknown_stage_names():
    def dup(p):
        p.add_stage("a", Recorder())
        p.add_stage("a", Recorder())

    with pytest.raises(ValueError, match="duplicate stage name 'a'"):
        _pipeline(dup)({}, PipelineConfig())
    pipe = _pipeline(lambda p: p.add_stage("only", Recorder()))({}, PipelineConfig())
    with pytest.raises(KeyError, match="no stage 'nope'; stages: only"):
        pipe.stage("nope")


# ------------------------------------------------------------------------------ required components
def test_missing_required_component_is_named():
    with pytest.raises(RegistryError, match=r"lacks required component\(s\) vae; this pipeline needs transformer, vae"):
        _pipeline(lambda p: None, modules=("transformer", "vae"))({"transformer": object()}, PipelineConfig())

    @attrs.define(kw_only=True)
    class OptionalVae(PipelineConfig):
        optional_components = ("vae",)

    _pipeline(lambda p: None, modules=("transformer", "vae"))({"transformer": object()}, OptionalVae())


@pytest.mark.parametrize("how", ["absent", "null"])
def test_checkpoint_missing_a_component_fails_before_loading(tmp_path, toy_folder, toy_manager, monkeypatch, how):
    folder = tmp_path / "no_vae"
    shutil.copytree(toy_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    if how == "absent":
        del index["vae"]
    else:
        index["vae"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    import diffcore.loader

    loaded = []
    real = diffcore.loader.load_component
    monkeypatch.setattr(diffcore.loader, "load_component", lambda folder, spec, **kw: loaded.append(spec.name) or real(folder, spec, **kw))
    with pytest.raises(RegistryError, match=r"ToyPipeline: model_index.json lacks required component\(s\) vae"):
        DiffGenerator.from_pretrained(folder, plugin_manager=toy_manager)
    assert loaded == []  # refused before any weights were read


def test_dataflow_covers_what_config_hooks_read_and_what_stages_consume(toy_gen):
    """Reads declared by the config's ``hook_inputs`` join the stage's contract; a consumed field is gone after."""
    import attrs

    from toy_plugin.pipelines import ToyPipeline

    components = toy_gen.components

    @attrs.define(kw_only=True)
    class ReadsImageLatents(type(toy_gen.config)):
        def hook_inputs(self):
            return {DenoisingStage: (In("image_latents", torch.Tensor),)}

    with pytest.raises(PipelineDataflowError) as exc_info:
        ToyPipeline(components, ReadsImageLatents())
    assert (exc_info.value.stage, exc_info.value.field) == ("denoising", "image_latents")

    @attrs.define(kw_only=True)
    class ReadsConditionWhenDecoding(type(toy_gen.config)):
        def hook_inputs(self):
            return {DecodingStage: (In("condition", dict),)}

    with pytest.raises(PipelineDataflowError) as exc_info:  # the denoising stage consumed it
        ToyPipeline(components, ReadsConditionWhenDecoding())
    assert (exc_info.value.stage, exc_info.value.field) == ("decoding", "condition")


def test_config_hook_reads_follow_the_stage_class_not_its_name(toy_gen):
    """``hook_inputs`` is keyed by stage class (a base class covers its subclasses): a pipeline that names its
    denoising stage differently still proves the hook's reads; a name as key is refused, not ignored."""
    import attrs

    from toy_plugin.pipelines import ToyPipeline

    class Renamed(ToyPipeline):
        def add_stage(self, name, stage):
            super().add_stage("denoise_it" if name == "denoising" else name, stage)

    @attrs.define(kw_only=True)
    class ReadsImageLatents(type(toy_gen.config)):
        def hook_inputs(self):
            return {DenoisingLoopStage: (In("image_latents", torch.Tensor),)}

    with pytest.raises(PipelineDataflowError) as exc_info:
        Renamed(toy_gen.components, ReadsImageLatents())
    assert (exc_info.value.stage, exc_info.value.field) == ("denoise_it", "image_latents")

    @attrs.define(kw_only=True)
    class KeyedByName(type(toy_gen.config)):
        def hook_inputs(self):
            return {"denoising": (In("image_latents", torch.Tensor),)}

    with pytest.raises(ConfigError, match="keys its reads by stage class"):
        ToyPipeline(toy_gen.components, KeyedByName())


def _quiet_leader(toy_gen):
    """A torchrun Leader over ``toy_gen`` alone: a channel that sends nowhere (no other rank), no heartbeat."""
    from diffcore.serve.distributed import Leader

    class Silent:
        rank, world_size = 0, 1

        def send(self, message):
            pass

    return Leader(toy_gen, Silent(), heartbeat_s=3600)


def test_the_served_model_protocol_names_what_a_server_uses(toy_gen):
    """DiffGenerator and the torchrun Leader are both ServedModels (the server and the scheduler use nothing
    else of them); an object lacking part of it is not one."""
    from diffcore.protocols import ServedModel

    leader = _quiet_leader(toy_gen)
    try:
        assert isinstance(toy_gen, ServedModel) and isinstance(leader, ServedModel)
        assert toy_gen.broken is None and leader.broken is None
    finally:
        leader.stop()
    assert not isinstance(toy_gen.pipeline, ServedModel)


def test_the_torchrun_leader_implements_every_served_model_member_itself(toy_gen):
    """The Leader declares ServedModel and defines each of its members in its own class (nothing is forwarded by
    a catch-all __getattr__, nothing falls through to the protocol's empty stubs); its reads are the local
    model's."""
    import typing

    from diffcore.protocols import ServedModel
    from diffcore.serve.distributed import Leader

    members = typing._get_protocol_attrs(ServedModel)
    assert {"request", "run_requests", "load_lora", "config", "model", "params_class"} <= members
    assert ServedModel in Leader.__mro__ and "__getattr__" not in vars(Leader)
    assert sorted(m for m in members if m not in vars(Leader)) == []

    leader = _quiet_leader(toy_gen)
    try:
        assert leader.config is toy_gen.config and leader.pipeline is toy_gen.pipeline
        assert leader.model == toy_gen.model and leader.sampling_params_cls is toy_gen.sampling_params_cls
        assert leader.loras == toy_gen.loras and leader.params_class({}) is toy_gen.params_class({})
        assert leader.request({"prompt": "x", "height": 32, "width": 32}).params.prompt == "x"
        with pytest.raises(AttributeError):
            leader.components  # not part of what a server may use
    finally:
        leader.stop()


def test_the_block_cache_protocol_is_a_protocol():
    """A model is a BlockCacheModel when it has the whole protocol; a part of it is not enough."""
    from diffcore.cache import CacheState, supports_step_cache
    from diffcore.protocols import BlockCacheModel

    class NoTail(torch.nn.Module):  # part of the protocol only
        cache_num_blocks = 2

        def cache_embed(self, hidden_states, timestep, **kwargs):
            return CacheState(hidden_states)

        def cache_blocks(self, state, start, stop):
            return state

    class Blocks(NoTail):
        def cache_tail(self, state):
            return state.hidden

    assert isinstance(Blocks(), BlockCacheModel) and supports_step_cache(Blocks())
    assert not supports_step_cache(NoTail()) and not supports_step_cache(torch.nn.Linear(2, 2))
