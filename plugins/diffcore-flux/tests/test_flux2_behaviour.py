"""FLUX.2 behaviour beyond parity: config selection and defaults, bad input (typed errors naming the parameter,
the generator still usable), the real [dev] tokenizer layout (PixtralProcessor) and BFL single files."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.errors import CheckpointVariantError, SamplingParamError, WeightMismatchError

SMALL = dict(num_inference_steps=2, max_sequence_length=16, height=32, width=32, output_type="np")


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def gens(flux2_folders):
    return {k: DiffGenerator.from_pretrained(f, dtype="float32", progress=False) for k, f in flux2_folders.items()}


def test_configs_and_defaults_follow_the_checkpoint(gens):
    names = {k: type(g.config).__name__ for k, g in gens.items()}
    assert names == {"dev": "Flux2DevConfig", "klein": "Flux2KleinConfig", "klein-base": "Flux2KleinConfig",
                     "klein-kv": "Flux2KleinKVConfig"}
    assert gens["klein"].config.is_distilled and not gens["klein-base"].config.is_distilled
    defaults = {k: (g.sampling_params_cls().num_inference_steps, g.sampling_params_cls().guidance_scale)
                for k, g in gens.items()}
    assert defaults == {"dev": (50, 4.0), "klein": (4, 1.0), "klein-base": (50, 4.0), "klein-kv": (4, 1.0)}


def test_too_many_references_then_generator_still_works(gens):
    gen = gens["dev"]
    with pytest.raises(SamplingParamError, match="at most 10") as e:
        gen.generate(prompt="a cat", image=[_image(64, 64, i) for i in range(11)], **SMALL)
    assert e.value.param == "image"
    assert gen.generate(prompt="a cat", seed=1, **SMALL).output.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("size,match", [((48, 80), ">= 64 px"), ((600, 64), "aspect ratio")])
def test_bad_reference_size_is_refused(gens, size, match):
    with pytest.raises(SamplingParamError, match=match) as e:
        gens["klein"].generate(prompt="a cat", image=[_image(64, 64), _image(*size)], **SMALL)
    assert e.value.param == "image" and "image[1]" in str(e.value)


def test_distilled_klein_warns_and_ignores_guidance(gens, caplog):
    gen = gens["klein"]
    base = gen.generate(prompt="a cat", seed=3, **SMALL).output
    with caplog.at_level(logging.WARNING):
        out = gen.generate(prompt="a cat", seed=3, guidance_scale=5.0, **SMALL).output
    assert any("guidance_scale=5.0 is ignored" in r.getMessage() for r in caplog.records)
    assert np.array_equal(out, base)


def test_base_klein_cfg_uses_the_empty_prompt(gens):
    """CFG on (guidance > 1) changes the picture; the negative is the empty prompt, as diffusers."""
    gen = gens["klein-base"]
    cfg = gen.generate(prompt="a cat", seed=3, guidance_scale=3.0, **SMALL).output
    off = gen.generate(prompt="a cat", seed=3, guidance_scale=1.0, **SMALL).output
    assert not np.allclose(cfg, off, atol=1e-4)


def test_references_reach_the_picture_and_default_size(gens):
    gen = gens["dev"]
    kw = {k: v for k, v in SMALL.items() if k not in ("height", "width")}
    a = gen.generate(prompt="a cat", image=[_image(96, 64, 1)], seed=2, **kw).output
    b = gen.generate(prompt="a cat", image=[_image(96, 64, 2)], seed=2, **kw).output
    assert a.shape == (1, 64, 96, 3)  # the first reference's size
    assert not np.allclose(a, b, atol=1e-4)


def test_pixtral_processor_tokenizer_folder_loads(flux2_folders, tmp_path, gens):
    """Real FLUX.2 [dev] folders list ``tokenizer: PixtralProcessor`` (a stub without torchvision): the tokenizer
    and its chat template are read from the folder directly, with the same result."""
    folder = tmp_path / "dev"
    shutil.copytree(flux2_folders["dev"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    tok = folder / "tokenizer"
    template = (tok / "chat_template.jinja").read_text()
    (tok / "chat_template.jinja").unlink()  # the processor's template file instead
    (tok / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (tok / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor", "patch_size": 16}))
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    kw = dict(prompt="a red cat", seed=4, **SMALL)
    assert np.array_equal(gen.generate(**kw).output, gens["dev"].generate(**kw).output)


def _bfl_file(folder, path, to_bfl):
    from safetensors.torch import load_file, save_file

    save_file(to_bfl(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")), path)
    return path


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_bfl_single_file_equals_the_folder(flux2_folders, gens, tmp_path, kind, flux2_to_bfl):
    path = _bfl_file(flux2_folders[kind], tmp_path / f"flux2-{kind}.safetensors", flux2_to_bfl)
    gen = DiffGenerator.from_pretrained(flux2_folders[kind], dtype="float32", progress=False, gguf=path)
    kw = dict(prompt="a cat", seed=6, **SMALL)
    assert np.array_equal(gen.generate(**kw).output, gens[kind].generate(**kw).output)


def test_dev_single_file_with_klein_config_is_refused(flux2_folders, tmp_path, flux2_to_bfl, gens):
    """A [dev] single file for a [klein] folder: a CheckpointVariantError naming which variant each is (a
    WeightMismatchError with the keys too); the folder then loads and generates as before."""
    path = _bfl_file(flux2_folders["dev"], tmp_path / "flux2-dev.safetensors", flux2_to_bfl)
    with pytest.raises(CheckpointVariantError, match="guidance_embedder") as e:
        DiffGenerator.from_pretrained(flux2_folders["klein"], dtype="float32", progress=False, gguf=path)
    assert isinstance(e.value, WeightMismatchError)
    assert e.value.file_variant.startswith("a FLUX.2 [dev]-style transformer (guidance embedding)")
    assert e.value.config_variant.startswith("a FLUX.2 [klein]-style transformer (no guidance embedding)")
    assert "flux2-dev.safetensors holds a FLUX.2 [dev]-style" in str(e.value) and "klein" in str(e.value)
    gen = DiffGenerator.from_pretrained(flux2_folders["klein"], dtype="float32", progress=False)
    kw = dict(prompt="a cat", seed=6, **SMALL)
    assert np.array_equal(gen.generate(**kw).output, gens["klein"].generate(**kw).output)


def test_file_of_the_same_variant_keeps_the_plain_mismatch(flux2_folders, tmp_path, flux2_to_bfl):
    """A truncated [klein] file is no other variant: the usual WeightMismatchError, not a variant error."""
    from safetensors.torch import load_file, save_file

    sd = load_file(_bfl_file(flux2_folders["klein"], tmp_path / "k.safetensors", flux2_to_bfl))
    save_file({k: v for k, v in sd.items() if "final_layer" not in k}, tmp_path / "cut.safetensors")
    with pytest.raises(WeightMismatchError, match="proj_out") as e:
        DiffGenerator.from_pretrained(flux2_folders["klein"], dtype="float32", progress=False,
                                      gguf=tmp_path / "cut.safetensors")
    assert not isinstance(e.value, CheckpointVariantError)


def test_dataflow_is_proven_for_every_flux2_pipeline(gens):
    from diffcore.testing.conformance import check_dataflow

    for kind, gen in gens.items():
        stages = check_dataflow(gen)
        assert stages[0] == "input_validation" and "image_vae_encoding" in stages and stages[-1] == "decoding", kind
