"""A folder declared as the wrong pipeline class is refused before loading, by one generic check in the core
(``ComposedPipelineBase.check_components`` over each pipeline's ``component_classes``), for every installed
family (issue 30: "a FLUX folder declared as WanPipeline"). The components are model_index.json's entries
as each family's Diffusers checkpoints write them."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from diffcore.errors import ComponentClassError, RegistryError
from diffcore.loader.model_index import ComponentSpec
from diffcore.plugins import PluginManager

# model_index.json entries of each family's checkpoints (diffusers' class names), the ones that tell them apart.
FAMILIES = {
    "FLUX.1": {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"},
    "FLUX.2": {"transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2"},
    "Qwen-Image": {"transformer": "QwenImageTransformer2DModel", "vae": "AutoencoderKLQwenImage"},
    "Z-Image": {"transformer": "ZImageTransformer2DModel", "vae": "AutoencoderKL"},
    "LTX-2": {"transformer": "LTX2VideoTransformer3DModel", "vae": "AutoencoderKLLTX2Video",
              "audio_vae": "AutoencoderKLLTX2Audio"},
    "Wan": {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan"},
}
# Each installed pipeline, and the family whose folders it runs (a plugin missing here fails the test).
OWN = {"FluxPipeline": "FLUX.1", "FluxKontextPipeline": "FLUX.1", "FluxFillPipeline": "FLUX.1",
       "Flux2Pipeline": "FLUX.2", "Flux2KleinPipeline": "FLUX.2", "Flux2KleinKVPipeline": "FLUX.2",
       "QwenImagePipeline": "Qwen-Image", "QwenImageEditPipeline": "Qwen-Image",
       "QwenImageEditPlusPipeline": "Qwen-Image", "QwenImageLayeredPipeline": "Qwen-Image",
       "ZImagePipeline": "Z-Image", "LTX2Pipeline": "LTX-2", "LTX2ImageToVideoPipeline": "LTX-2",
       "WanPipeline": "Wan", "WanImageToVideoPipeline": "Wan", "WanDMDPipeline": "Wan", "WanCausalDMDPipeline": "Wan"}


def _components(family: str) -> dict:
    return {name: ComponentSpec(name=name, library="diffusers", class_name=cls) for name, cls in FAMILIES[family].items()}


@pytest.fixture(scope="module")
def installed():
    registry = PluginManager().registry
    return {name: registry.get("pipelines", name) for name in registry.names("pipelines")}


def test_every_installed_pipeline_declares_its_transformer_and_vae(installed):
    assert set(OWN) <= set(installed), sorted(set(OWN) - set(installed))  # the six plugins are installed
    for name, cls in installed.items():
        assert {"transformer", "vae"} <= set(cls.component_classes), name


@pytest.mark.parametrize("pipeline", sorted(OWN))
def test_another_familys_folder_is_refused_naming_the_component(installed, pipeline):
    cls = installed[pipeline]
    config = SimpleNamespace(optional_components=cls._required_config_modules)  # only the classes are compared here
    cls.check_components(_components(OWN[pipeline]), config)  # its own family's folder passes
    for family in FAMILIES:
        if family == OWN[pipeline]:
            continue
        with pytest.raises(ComponentClassError) as info:
            cls.check_components(_components(family), config)
        err = info.value
        assert isinstance(err, RegistryError) and err.pipeline == pipeline
        assert FAMILIES[family][err.component] == err.found and err.found not in cls.component_classes[err.component]
        assert f"component {err.component!r} is a {err.found}" in str(err)


def test_the_shipped_flux_folder_declared_as_zimage_is_refused_before_loading(tmp_path, monkeypatch):
    """End to end through from_pretrained: the demo plugin's real FLUX.1 folder (vae AutoencoderKL, as Z-Image's)
    declared as ZImagePipeline: its transformer tells them apart; nothing is loaded."""
    from diffcore import DiffGenerator, loader
    from diffcore_demo.plugin import model_path

    folder = shutil.copytree(model_path(), tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("_name_or_path", None)  # not recognised as the demo by name
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "ZImagePipeline"}))
    monkeypatch.setattr(loader, "load_component", lambda *a, **k: pytest.fail("loaded a component"))
    with pytest.raises(ComponentClassError, match="component 'transformer' is a FluxTransformer2DModel.*ZImageTransformer2DModel"):
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
