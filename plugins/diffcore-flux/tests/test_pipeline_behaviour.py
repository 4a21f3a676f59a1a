"""FLUX pipeline behaviour beyond parity: sizes, defaults, bad input, CLI, per-step callback."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
from PIL import Image

from diffcore import DiffGenerator
from diffcore.cli import main as cli
from diffcore.errors import RegistryError, SamplingParamError


@pytest.fixture(scope="module")
def dev(flux_folders):
    return DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)


def test_size_not_multiple_of_16_is_rounded_down_with_warning(dev, caplog):
    with caplog.at_level(logging.WARNING):
        result = dev.generate(prompt="a cat", height=40, width=70, num_inference_steps=1)
    assert result.images[0].size == (64, 32)  # (width, height): 70 -> 64, 40 -> 32, as diffusers rounds
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "height=40" in messages and "width=70" in messages


def test_defaults_and_configs_follow_the_checkpoint(flux_folders, dev):
    schnell = DiffGenerator.from_pretrained(flux_folders["schnell"], dtype="float32", progress=False)
    assert type(dev.config).__name__ == "FluxDevConfig"
    assert type(schnell.config).__name__ == "FluxSchnellConfig"  # detected from guidance_embeds=false
    d, s = dev.sampling_params_cls(), schnell.sampling_params_cls()
    assert (d.height, d.width, d.num_inference_steps, d.guidance_scale, d.max_sequence_length) == (1024, 1024, 28, 3.5, 512)
    assert (s.num_inference_steps, s.guidance_scale, s.max_sequence_length) == (4, 0.0, 256)
    with pytest.raises(SamplingParamError, match="max_sequence_length"):
        schnell.generate(prompt="a cat", max_sequence_length=300)


def test_default_precisions_and_fp32_override(flux_folders, dev):
    import torch

    default = DiffGenerator.from_pretrained(flux_folders["dev"], progress=False)
    assert default.components["transformer"].dtype == torch.bfloat16
    assert dev.components["transformer"].dtype == torch.float32
    assert dev.components["text_encoder_2"].dtype == torch.float32


def test_callback_sees_every_step(dev):
    seen = []
    dev.generate(prompt="a cat", height=32, width=32, num_inference_steps=3, callback=lambda i, t, x: seen.append((i, float(t))))
    assert [i for i, _ in seen] == [0, 1, 2]
    assert seen[0][1] > seen[-1][1]  # timesteps decrease


def test_kontext_requires_an_image(flux_folders):
    gen = DiffGenerator.from_pretrained(flux_folders["kontext"], dtype="float32", progress=False)
    with pytest.raises(SamplingParamError, match="image"):
        gen.generate(prompt="make it red", height=32, width=32)


def test_kontext_sizes_from_the_image_it_decoded_once(flux_folders, tmp_path, monkeypatch):
    """Without a size, Kontext keeps the input's aspect: it reads the image input validation decoded
    (req.images), never the file a second time."""
    gen = DiffGenerator.from_pretrained(flux_folders["kontext"], dtype="float32", progress=False)
    monkeypatch.setattr(gen.config, "max_area", 64 * 32)
    path = tmp_path / "wide.png"
    Image.new("RGB", (80, 40), (200, 30, 30)).save(path)
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    req = gen.request(dict(prompt="make it blue", image=str(path)))
    assert (req.width, req.height) == (64, 32)  # the 2:1 aspect at max_area
    assert opened == [path] and req.images[0].size == (80, 40)  # decoded once


def test_missing_component_is_named(flux_folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(flux_folders["dev"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(RegistryError, match="text_encoder_2"):
        DiffGenerator.from_pretrained(folder, dtype="float32")


def test_cli_lists_plugin_and_generates(flux_folders, tmp_path, capsys):
    assert cli(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    flux = [p for p in listing["plugins"] if p["name"] == "flux"]
    assert flux and {"FluxPipeline", "FluxKontextPipeline"} <= set(flux[0]["pipelines"])
    out = tmp_path / "x.png"
    assert cli(["generate", "--model", str(flux_folders["dev"]), "--prompt", "a cat", "--height", "32", "--width", "48",
                "--steps", "2", "--quiet", "--output", str(out)]) == 0
    assert Image.open(out).size == (48, 32)


def test_nan_guidance_is_refused_and_ignored_negative_prompt_warns(dev, caplog):
    """FLUX.1-dev used to return an all-NaN picture for guidance_scale=nan; NaN true_cfg_scale used to turn
    true CFG off silently. Both are refused; a negative prompt without true CFG warns, as in diffusers."""
    small = dict(height=32, width=32, num_inference_steps=2, output_type="np")
    for name in ("guidance_scale", "true_cfg_scale"):
        with pytest.raises(SamplingParamError, match="finite") as e:
            dev.generate(prompt="a cat", **{name: float("nan")}, **small)
        assert e.value.param == name
    with caplog.at_level(logging.WARNING, logger="diffcore.stages.input_validation"):
        out = dev.generate(prompt="a cat", negative_prompt="blurry", **small).output
    assert "negative_prompt is ignored: classifier-free guidance is off (true_cfg_scale <= 1)" in caplog.text
    import numpy as np

    assert np.isfinite(out).all()


def test_guidance_scale_on_schnell_is_named_as_ignored_and_refused_over_http(flux_folders, caplog):
    """Issue 30's case: FLUX.1-schnell has no guidance embedding, so a guidance_scale changes nothing. Python warns
    and the result names it; the server refuses it with a 400 naming the field (after the first run, on arrival)."""
    pytest.importorskip("fastapi")
    import httpx

    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.serving import running_server

    schnell = DiffGenerator.from_pretrained(flux_folders["schnell"], dtype="float32", progress=False)
    small = dict(prompt="a cat", height=32, width=32, num_inference_steps=1, output_type="np")
    with caplog.at_level(logging.WARNING):
        result = schnell.generate(**small, guidance_scale=3.5)
    assert result.ignored_parameters == ("guidance_scale",)
    assert any("guidance_scale is ignored" in r.getMessage() for r in caplog.records)
    with running_server(schnell, ServeSettings(served_model_name="schnell")) as (base, _):
        r = httpx.post(base + "/v1/images/generations", timeout=60,
                       json={"prompt": "a cat", "size": "32x32", "num_inference_steps": 1, "guidance_scale": 3.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance_scale", r.text
    assert r.json()["error"]["code"] == "unused_parameter"
