"""Qwen plugin wiring: registration and detection, defaults, the torchvision-free processor, bad input,
the CLI, and the memory of an Edit run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.errors import SamplingParamError
from diffcore.loader import read_model_index
from diffcore.plugins import get_plugin_manager

PLUGIN_ROOT = Path(__file__).resolve().parents[1]


def _image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def edit_gen(qwen_folders):
    return DiffGenerator.from_pretrained(qwen_folders["edit"], dtype="float32", progress=False)


# ---- registration ------------------------------------------------------------------------------
def test_plugin_module_imports_without_torch():
    code = "import sys, diffcore_qwen.plugin; bad = [m for m in sys.modules if m.split('.')[0] == 'torch']; assert not bad, bad"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_registered_through_the_entry_point():
    manager = get_plugin_manager()
    if "qwen" not in manager.plugins:
        pytest.skip("diffcore-qwen is not installed (pip install -e plugins/diffcore-qwen)")
    reg = manager.registry
    for name in ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"):
        assert reg.origin("pipelines", name).distribution == "diffcore-qwen"
    assert reg.origin("modules", "QwenImageTransformer2DModel").plugin == "qwen"
    for hf_id, pipeline, name in [("Qwen/Qwen-Image", "QwenImagePipeline", "qwen-image"),
                                  ("Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", "qwen-image-edit"),
                                  ("Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", "qwen-image-edit-2509")]:
        rec = next(e.record for e in reg.tables["configs"].values() if hf_id in e.record.hf_ids)
        assert (rec.pipeline_name, rec.name) == (pipeline, name)


def test_local_folders_are_detected(qwen_folders, tmp_path):
    reg = get_plugin_manager().registry
    want = {"t2i": "qwen-image", "edit": "qwen-image-edit", "edit_plus": "qwen-image-edit-2509"}
    for variant, folder in qwen_folders.items():
        assert reg.select_config(str(folder), read_model_index(folder), folder).name == want[variant]
    # Qwen-Image-Edit-2511 shares the 2509 pipeline class; its transformer config has zero_cond_t.
    folder = tmp_path / "edit2511"
    shutil.copytree(qwen_folders["edit_plus"], folder)
    cfg_path = folder / "transformer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "zero_cond_t": True}))
    assert reg.select_config(str(folder), read_model_index(folder), folder).name == "qwen-image-edit-2511"


def test_defaults():
    from diffcore_qwen import configs as C

    t2i, edit, plus = C.QwenImageSamplingParams(), C.QwenImageEditSamplingParams(), C.QwenImageEditPlusSamplingParams()
    assert (t2i.num_inference_steps, edit.num_inference_steps, plus.num_inference_steps) == (50, 50, 40)
    assert t2i.true_cfg_scale == edit.true_cfg_scale == plus.true_cfg_scale == 4.0
    assert (edit.min_images, edit.max_images, plus.min_images, plus.max_images) == (1, 1, 1, 3)
    assert C.QwenImageSamplingParams.max_sequence_length_limit == 1024
    for cfg, drop in ((C.QwenImageConfig(), 34), (C.QwenImageEditConfig(), 64), (C.QwenImageEditPlusConfig(), 64)):
        assert cfg.default_negative_prompt == " " and cfg.drop_tokens == drop and cfg.cfg_norm_rescale
    assert C.calculate_dimensions(1024 * 1024, 1.5) == (1248, 832)
    assert C.calculate_dimensions(384 * 384, 0.75) == (320, 448)


# ---- the processor -----------------------------------------------------------------------------
def test_processor_loads_without_torchvision_and_equals_qwen2vl_processor(edit_gen, make_vl_processor):
    from diffcore_qwen.processor import QwenVLProcessor

    proc = edit_gen.components["processor"]
    assert isinstance(proc, QwenVLProcessor)
    real = make_vl_processor(proc.tokenizer, proc.image_processor)
    texts = ["Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|>"
             "<|vision_end|>make it red", "<|vision_start|><|image_pad|><|vision_end|>a cat"]
    images = [_image(90, 60), _image(50, 120, seed=1), _image(64, 64, seed=2)]
    want = real(text=texts, images=images, padding=True, return_tensors="pt")
    got = proc(text=texts, images=images)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(got[key], want[key]), key
    assert (got["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == \
        sum(int(g.prod()) // 4 for g in got["image_grid_thw"])
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders .* but 3 images"):
        proc(text=texts[:1], images=images)


def test_last_hidden_state_equals_hidden_states_minus_one(edit_gen):
    from diffcore_qwen.configs import last_hidden_state

    encoder, tok = edit_gen.components["text_encoder"], edit_gen.components["processor"].tokenizer
    inputs = dict(tok(["a red cat", "a"], padding=True, return_tensors="pt"))
    with torch.inference_mode():
        want = encoder(**inputs, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(last_hidden_state(encoder, inputs), want, atol=0, rtol=0)


# ---- bad input ---------------------------------------------------------------------------------
def _error(gen, **kw) -> SamplingParamError:
    with pytest.raises(SamplingParamError) as info:
        gen.generate(**{"prompt": "make it red", "num_inference_steps": 2, "height": 32, "width": 32, **kw})
    return info.value


def test_bad_images_are_clear_errors(edit_gen, qwen_folders, tmp_path):
    err = _error(edit_gen)
    assert err.param == "image" and "at least 1" in str(err)
    err = _error(edit_gen, image=[_image(32, 32), _image(32, 32)])
    assert err.param == "image" and "at most 1" in str(err)
    plus = DiffGenerator.from_pretrained(qwen_folders["edit_plus"], dtype="float32", progress=False)
    err = _error(plus, image=[_image(32, 32)] * 4)
    assert err.param == "image" and "at most 3" in str(err)
    t2i = DiffGenerator.from_pretrained(qwen_folders["t2i"], dtype="float32", progress=False)
    assert "no input image" in str(_error(t2i, image=_image(32, 32)))

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for kw in ({}, {"height": None, "width": None}):  # with a default size the image is read to size the output
        err = _error(edit_gen, image=str(corrupt), **kw)
        assert err.param == "image" and "not a readable image" in str(err) and "corrupt.png" in str(err)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(deep)  # 16-bit greyscale
    err = _error(edit_gen, image=str(deep))
    assert err.param == "image" and "not supported" in str(err)
    err = _error(edit_gen, image=Image.new("CMYK", (16, 16)))
    assert err.param == "image" and "'CMYK'" in str(err)
    err = _error(edit_gen, image=str(tmp_path / "missing.png"))
    assert err.param == "image" and "does not exist" in str(err)
    err = _error(edit_gen, image=_image(32, 32), max_sequence_length=2048)
    assert err.param == "max_sequence_length" and "1024" in str(err)


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_generate_edit(qwen_folders, tmp_path):
    from diffcore.cli import main

    src, out = tmp_path / "in.png", tmp_path / "out.png"
    _image(60, 40).convert("RGBA").save(src)  # RGBA is converted, not refused
    rc = main(["generate", "--model", str(qwen_folders["edit"]), "--image", str(src), "--prompt", "make it red",
               "--output", str(out), "--steps", "2", "--height", "32", "--width", "64", "--dtype", "float32",
               "--quiet"])
    assert rc == 0
    with Image.open(out) as img:
        assert img.size == (64, 32) and img.mode == "RGB"
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    rc = main(["generate", "--model", str(qwen_folders["edit"]), "--image", str(bad), "--prompt", "x",
               "--output", str(tmp_path / "o.png"), "--steps", "2", "--quiet"])
    assert rc == 2


# ---- memory ------------------------------------------------------------------------------------
MEMORY_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys, numpy as np, torch
    from PIL import Image
    from diffcore import DiffGenerator

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith(key))  # MiB

    gen = DiffGenerator.from_pretrained(sys.argv[1], dtype="float32", progress=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    gen.generate(image=image, prompt="make it red", height=32, width=32, num_inference_steps=2)
    run_peak = status("VmHWM")  # the whole process so far: imports, loading, one Edit run with true CFG
    req = type("R", (), {"images": [image], "batch_size": 1, "device": torch.device("cpu"), "height": 32,
                         "width": 32, "extra": {}})()
    trim = ctypes.CDLL("libc.so.6").malloc_trim  # hand freed heap back to the OS: RSS then counts live memory
    trim(0)
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    latents = gen.config.encode_condition_images(gen.components, req)
    peak = status("VmHWM")
    trim(0)
    after = status("VmRSS")
    print(json.dumps({"before": before, "encode_peak": peak, "after": after, "run_peak": run_peak}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_edit_vae_encode_frees_its_activations(qwen_folders):
    """The ~1 MP VAE encode of the input needs well over 100 MiB of activations at its peak; once it returns,
    resident memory must be back to where it was (plus the small latents)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(PLUGIN_ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(qwen_folders["edit"])], env=env, check=True,
                         capture_output=True, text=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"peak RSS: VAE encode {m['encode_peak']} MiB (from {m['before']}, after {m['after']}), "
          f"whole Edit run {m['run_peak']} MiB")
    assert m["encode_peak"] - m["before"] > 50  # the encode really works at ~1 MP
    assert m["after"] - m["before"] < 0.1 * (m["encode_peak"] - m["before"]) + 8
