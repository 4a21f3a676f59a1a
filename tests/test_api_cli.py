"""The public Python API (results, saving, output types, timings, precisions) and the ``diffcore`` CLI."""
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
from PIL import Image

from diffcore import DiffGenerator
from diffcore.cli import main
from diffcore.errors import InputError
from diffcore.plugins import PluginManager

TESTS = Path(__file__).resolve().parent
STAGES = ["input_validation", "text_encoding", "timestep_preparation", "latent_preparation", "conditioning",
          "denoising", "decoding"]

HOOK_RAISES = """
from diffcore.hookspecs import hookimpl

@hookimpl
def register_pipelines():
    raise ValueError("hook exploded")
"""


def _script() -> str:
    path = Path(sys.executable).with_name("diffcore")
    found = str(path) if path.exists() else shutil.which("diffcore")
    assert found, "the `diffcore` console script is not installed (pip install -e .)"
    return found


def _run(args, env_path: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([*map(str, env_path), os.environ.get("PYTHONPATH", "")])}
    for name in ("DIFFCORE_STRICT_PLUGINS", "DIFFCORE_PLUGINS", "DIFFCORE_TRACE_PLUGINS"):
        env.pop(name, None)
    return subprocess.run([_script(), *args], env=env, capture_output=True, text=True, timeout=300)


def _check_plugins_json(data: dict) -> None:
    assert set(data) == {"plugins", "errors"}
    for p in data["plugins"]:
        assert set(p) == {"name", "distribution", "version", "pipelines", "models", "stages", "descriptions",
                          "compositions"}
        assert isinstance(p["name"], str) and all(isinstance(p[k], list) for k in ("pipelines", "models", "stages"))
        assert set(p["descriptions"]) <= set(p["pipelines"])
        assert all(set(c) == {"name", "pipeline", "task", "description"} for c in p["compositions"])
    for e in data["errors"]:
        assert set(e) == {"plugin", "error"} and isinstance(e["error"], str)


# ------------------------------------------------------------------------------------------ API
def test_output_types_np_pil_latent(toy_gen):
    kw = dict(prompt="a red circle", height=32, width=48, seed=5)
    np_res = toy_gen.generate(output_type="np", **kw)
    assert np_res.output.shape == (1, 32, 48, 3) and np_res.output.dtype == np.float32
    pil_res = toy_gen.generate(output_type="pil", **kw)
    [image] = pil_res.images
    assert image.size == (48, 32) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), (np.clip(np_res.output[0], 0, 1) * 255).round().astype(np.uint8))
    assert [len(f) for f in pil_res.frames] == [1]  # an image model: one frame per item
    latent = toy_gen.generate(output_type="latent", **kw)
    assert latent.output is None and latent.images == [] and "decoding" in latent.timings
    assert latent.latents.shape == (1, (32 // 4) * (48 // 4), 16)  # packed 2x2 tokens of 4 channels
    torch.testing.assert_close(latent.latents, np_res.latents, rtol=0, atol=0)


def test_timings_have_every_stage(toy_gen):
    timings = toy_gen.generate(prompt="a cat", output_type="np").timings
    assert set(timings) == set(STAGES) | {"total"}
    assert all(isinstance(v, float) and v >= 0 for v in timings.values())
    assert timings["total"] >= max(timings[s] for s in STAGES)


def test_batch_of_prompts_matches_single_runs(toy_gen):
    both = toy_gen.generate(prompt=["a red circle", "a blue square"], seed=3, output_type="np").output
    first = toy_gen.generate(prompt="a red circle", seed=3, output_type="np").output
    assert both.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(both[0], first[0], atol=1e-5)  # same noise for item 0, as diffusers draws it
    assert np.abs(both[1] - both[0]).max() > 0.01


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_save_image_formats(toy_gen, tmp_path, suffix, fmt):
    result = toy_gen.generate(prompt="a cat", height=32, width=48, output_type="np")
    path = result.save(tmp_path / f"out{suffix}")
    with Image.open(path) as img:
        assert img.format == fmt and img.size == (48, 32)


def test_save_errors(toy_gen, tmp_path):
    result = toy_gen.generate(prompt="a cat", output_type="np")
    with pytest.raises(InputError, match=r"cannot save .*out\.gif.*\.jpg.*\.mp4.*\.png.*\.webp"):
        result.save(tmp_path / "out.gif")
    latent = toy_gen.generate(prompt="a cat", output_type="latent")
    with pytest.raises(InputError, match="latents only"):
        latent.save(tmp_path / "out.png")


def test_dtype_none_uses_config_precisions_and_float32_forces_fp32(toy_folder, toy_manager, toy_gen, fastpath_mode,
                                                                   monkeypatch):
    from diffcore import fastpaths

    native = {**fastpaths.cpu_features(), "avx512_bf16": True}  # on a CPU without native bf16: see test_precision
    monkeypatch.setattr(fastpaths, "cpu_features", lambda: native)
    mixed = DiffGenerator.from_pretrained(toy_folder, dtype=None, progress=False, plugin_manager=toy_manager)
    c = mixed.components
    # ToyConfig: bfloat16 by default, the VAE in float32
    assert c["transformer"].dtype == torch.bfloat16 and c["text_encoder"].dtype == torch.bfloat16
    assert c["vae"].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in c["transformer"].parameters())
    assert all(getattr(m, "dtype", torch.float32) == torch.float32 for m in toy_gen.components.values())
    assert all(p.dtype == torch.float32 for p in toy_gen.components["transformer"].parameters())
    low = mixed.generate(prompt="a cat", seed=4, output_type="np").output
    ref = toy_gen.generate(prompt="a cat", seed=4, output_type="np").output
    assert np.isfinite(low).all() and low.min() >= 0 and low.max() <= 1
    assert 0 < np.abs(low - ref).mean() < 0.02  # the same picture, really computed in lower precision
    forced = DiffGenerator.from_pretrained(toy_folder, dtype="bfloat16", progress=False, plugin_manager=toy_manager)
    assert forced.components["vae"].dtype == torch.bfloat16  # an explicit dtype overrides the config


def test_meta_build_still_works_after_transformers_patched_linspace():
    """transformers 5 swaps torch.linspace while it meta-builds a text encoder; if torch's device-context
    table is first built inside that window, linspace escapes ``with torch.device("meta")`` for good.
    Reproduce that state, then build a diffcore module on meta: its linspace buffer must be on meta too."""
    init = pytest.importorskip("transformers.initialization")
    if not hasattr(init, "meta_device_safe_creation_ops"):
        pytest.skip("this transformers does not patch torch.linspace")
    from torch.utils._device import _device_constructors

    from diffcore.models.base import ModelMixin

    class LinspaceNet(ModelMixin):
        def __init__(self, n: int = 3):
            super().__init__()
            self.register_buffer("table", torch.linspace(0, 1, n), persistent=False)

    _device_constructors.cache_clear()
    with init.meta_device_safe_creation_ops(), torch.device("meta"):
        torch.empty(0)  # the table is built now, holding transformers' wrapper
    try:
        assert LinspaceNet.from_config({"n": 3}, device="meta").table.is_meta
    finally:
        _device_constructors.cache_clear()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_plugins_json_in_process(global_manager, toy_module, make_plugin, capsys):
    def explode():
        raise ValueError("hook exploded")

    manager = PluginManager(load_entrypoints=False, plugins=[("toy", toy_module),
                                                             ("exploding", make_plugin("exploding", register_pipelines=explode))])
    global_manager(manager)
    with pytest.warns(RuntimeWarning):
        assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    _check_plugins_json(data)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["toy"]["pipelines"] == ["ToyPipeline"]
    assert by_name["toy"]["descriptions"] == {"ToyPipeline": "toy text-to-image"}
    assert "ToyNoopStage" in by_name["toy"]["stages"] and "toy-base" in by_name["toy"]["models"]
    core = by_name["diffcore"]
    assert (core["distribution"], core["version"], core["pipelines"]) == ("diffcore", "0.1.0", [])
    assert "DenoisingStage" in core["stages"]
    assert data["errors"] == [{"plugin": "exploding",
                               "error": "hook register_pipelines raised ValueError: hook exploded"}]
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "pipeline  ToyPipeline: toy text-to-image" in text
    assert "ERROR exploding: hook register_pipelines raised ValueError" in text


def test_cli_plugins_json_console_script(make_dist):
    site = make_dist("diffcore-toy", "toy_plugin", ep_name="toy", entry_point="toy_plugin.plugin")
    make_dist("diffcore-hookfail", "dc_cli_hookfail", HOOK_RAISES, ep_name="hookfail")
    proc = _run(["plugins", "--json"], [site, TESTS])
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    _check_plugins_json(data)
    by_name = {p["name"]: p for p in data["plugins"]}
    toy = by_name["toy"]
    assert (toy["distribution"], toy["version"], toy["pipelines"]) == ("diffcore-toy", "0.1", ["ToyPipeline"])
    assert {"plugin": "hookfail", "error": "hook register_pipelines raised ValueError: hook exploded"} in data["errors"]


def _generate_args(model, out, *extra):
    return ["generate", "--model", str(model), "--prompt", "a red circle", "--height", "32", "--width", "48",
            "--steps", "2", "--seed", "9", "--dtype", "float32", "--quiet", "--output", str(out), *extra]


def test_cli_generate_writes_the_requested_image(global_manager, toy_manager, toy_folder, toy_gen, tmp_path, capsys):
    global_manager(toy_manager)
    out = tmp_path / "x.png"
    assert main(_generate_args(toy_folder, out)) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (48, 32)
        pixels = np.asarray(img)
    ref = toy_gen.generate(prompt="a red circle", height=32, width=48, num_inference_steps=2, seed=9).images[0]
    np.testing.assert_array_equal(pixels, np.asarray(ref))  # the flags reached the generator


def test_flow_shift_is_per_request_and_reaches_the_cli(global_manager, toy_manager, toy_folder, toy_gen, tmp_path):
    """The toy folder's scheduler_config.json says shift 3.0; flow_shift=1.5 changes one request only."""
    kw = dict(prompt="a red circle", height=32, width=48, num_inference_steps=2, seed=9, output_type="np")
    plain = toy_gen.generate(**kw).output
    shifted = toy_gen.generate(**kw, flow_shift=1.5).output
    assert np.abs(plain - shifted).max() > 1e-3
    np.testing.assert_array_equal(toy_gen.generate(**kw).output, plain)  # the loaded scheduler is untouched
    assert toy_gen.components["scheduler"].config["shift"] == 3.0
    global_manager(toy_manager)
    out = tmp_path / "shifted.png"
    assert main(_generate_args(toy_folder, out, "--flow-shift", "1.5")) == 0
    want = toy_gen.generate(**{**kw, "output_type": "pil"}, flow_shift=1.5).images[0]
    with Image.open(out) as img:
        np.testing.assert_array_equal(np.asarray(img), np.asarray(want))


def test_cli_errors_exit_2_with_a_message(global_manager, toy_manager, toy_folder, tmp_path, capsys):
    global_manager(toy_manager)
    cases = [
        (_generate_args(tmp_path / "missing", tmp_path / "a.png"), "does not exist"),
        (_generate_args(tmp_path / "missing", tmp_path / "a.gif"), "cannot save"),  # checked before loading
        (_generate_args(toy_folder, tmp_path / "a.png", "--width", "0"), "'width'"),
        (_generate_args(toy_folder, tmp_path / "a.png", "--image", str(tmp_path / "none.png")), "'image'"),
    ]
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    cases.append((_generate_args(qwen, tmp_path / "a.png"), "pip install diffcore-qwen"))
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        [line] = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert expected in line and "Traceback" not in err, err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.gif").exists()


def test_cli_bad_model_console_script(tmp_path):
    proc = _run(["generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "x",
                 "--output", str(tmp_path / "x.png")], [TESTS])
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "no-such-model does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.png").exists()
