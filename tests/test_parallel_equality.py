"""Sequence parallelism (Ulysses), CFG parallelism and both together equal one process.

Real gloo process groups: each configuration is one ``torchrun`` launch of
``diffcore.testing.parallel`` running every case (FLUX dev and Kontext, Qwen-Image T2I and Edit,
Wan 2.1 T2V and I2V (CLIP image context), Wan 2.2 A14B with two experts, Wan 2.2 TI2V-5B with an image,
Qwen-Image-Edit-2509 (Edit Plus) with two input images of different sizes, FLUX.2 [klein] base with CFG and
two references, Z-Image with CFG truncation, FLUX.1 and FLUX.2 [klein] inpainting and Qwen-Image image-to-image,
FBCache, and LTX-2.0 /
2.3 with their extra guidance branches under CFG parallelism, frames and sound), on tiny
perturbed checkpoints built by the plugins' builders. Each rank's output must equal
rank 0's bit for bit and the one-process output (this pytest process, same code without parallel
options) to fp32 max |diff| <= 1e-4 and PSNR >= 60 dB. Token counts are odd so sequence
parallelism pads and masks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcore.testing.parallel import run_case
from diffcore.testing.weights import max_abs_diff, psnr

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"sp2": (2, {"sp_degree": 2}), "cfg": (2, {"cfg_parallel": True}),
           "sp2_cfg": (4, {"sp_degree": 2, "cfg_parallel": True})}
LAUNCH_TIMEOUT = 600  # seconds; a hang (mismatched collectives) fails instead of blocking CI


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Tiny checkpoints (one per family variant) and the cases run on them."""
    root = tmp_path_factory.mktemp("parallel")
    flux = _load(ROOT / "plugins/diffcore-flux/tests/conftest.py", "_par_flux_conftest")
    qwen = _load(ROOT / "plugins/diffcore-qwen/tests/conftest.py", "_par_qwen_conftest")
    wan = _load(ROOT / "plugins/diffcore-wan/tests/wan_testlib.py", "_par_wan_testlib")
    ltx = _load(ROOT / "plugins/diffcore-ltx/tests/ltx_testlib.py", "_par_ltx_testlib")
    builders = {"flux_dev": lambda: flux.build_flux_pipeline(), "flux_kontext": lambda: flux.build_flux_pipeline(kontext=True),
                "qwen_t2i": lambda: qwen.build_qwen_pipeline("t2i"), "qwen_edit": lambda: qwen.build_qwen_pipeline("edit"),
                "wan21": lambda: wan.build_wan_pipeline("t2v21"), "wan22_a14b": lambda: wan.build_wan_pipeline("t2v22"),
                "wan22_ti2v": lambda: wan.build_wan_pipeline("ti2v"), "wan21_i2v": lambda: wan.build_wan_pipeline("i2v21"),
                "qwen_edit_plus": lambda: qwen.build_qwen_pipeline("plus"),
                "flux2_klein_base": lambda: flux.build_flux2_pipeline("klein-base"),
                "ltx2": lambda: ltx.diffusers_pipeline(), "ltx23": lambda: ltx.diffusers_pipeline(version="2.3")}
    folders = {}
    for name, build in builders.items():
        build().save_pretrained(root / name)
        folders[name] = str(root / name)
    from diffcore_zimage.testing import write_tiny_zimage  # written with diffcore's modules, diffusers' layout

    folders["zimage"] = str(write_tiny_zimage(root / "zimage"))
    cfg = {"negative_prompt": "blurry"}
    specs = [  # name, model, generate kwargs, image; image token counts are odd (padding under sp 2)
        ("flux_dev", "flux_dev", dict(prompt="a red circle", height=48, width=48, num_inference_steps=2,
                                      true_cfg_scale=3.0, max_sequence_length=16, seed=3, **cfg), None),
        ("flux_kontext", "flux_kontext", dict(prompt="make it red", height=48, width=48, num_inference_steps=2,
                                              true_cfg_scale=2.0, max_sequence_length=16, seed=3, **cfg), [40, 40, 0]),
        ("qwen_t2i", "qwen_t2i", dict(prompt="a red circle", height=96, width=32, num_inference_steps=2,
                                      true_cfg_scale=4.0, seed=5, **cfg), None),
        ("qwen_edit", "qwen_edit", dict(prompt="make it red", height=96, width=32, num_inference_steps=2,
                                        true_cfg_scale=4.0, seed=5, **cfg), [60, 40, 1]),
        ("wan21", "wan21", dict(prompt="a cat", num_frames=9, height=48, width=48, num_inference_steps=2,
                                guidance_scale=4.0, seed=7, **cfg), None),
        ("wan22_a14b", "wan22_a14b", dict(prompt="a cat", num_frames=9, height=48, width=48, num_inference_steps=3,
                                          guidance_scale=4.0, guidance_scale_2=3.0, seed=7, **cfg), None),
        ("wan22_ti2v", "wan22_ti2v", dict(prompt="a cat", num_frames=9, height=96, width=96, num_inference_steps=2,
                                          guidance_scale=4.0, seed=7, **cfg), [96, 96, 2]),
        ("wan21_i2v", "wan21_i2v", dict(prompt="a cat", num_frames=9, height=48, width=48, num_inference_steps=2,
                                        guidance_scale=4.0, seed=7, **cfg), [56, 40, 3]),  # CLIP image context
        ("qwen_edit_plus", "qwen_edit_plus", dict(prompt="make it red", height=96, width=32, num_inference_steps=2,
                                                  true_cfg_scale=4.0, seed=5, **cfg),
         [[60, 40, 1], [40, 56, 4]]),  # Edit-2509: two inputs of different sizes, each its own latents / RoPE frame
        ("flux2_klein_base", "flux2_klein_base", dict(prompt="make it red", height=48, width=48, num_inference_steps=2,
                                                      guidance_scale=3.0, max_sequence_length=16, seed=3),
         [[80, 64, 1], [64, 96, 2]]),  # FLUX.2: CFG vs the empty prompt, two references (t = 10, 20)
        # Z-Image: captions of different lengths (masked rows); truncation ends CFG at the last step (model time 0.4)
        ("zimage", "zimage", dict(prompt=["a red circle", "two yellow squares on a white background"], height=48,
                                  width=80, num_inference_steps=3, guidance_scale=4.0, cfg_truncation=0.3,
                                  cfg_normalization=True, seed=9, **cfg), None),
    ]
    out = [{"name": n, "model": folders[m], "engine": {}, "generate": g, "image": i} for n, m, g, i in specs]
    # LTX-2 (frames and waveform compared): CFG + STG + modality isolation = 4 branches a step, shared out 2 + 2
    # between the CFG ranks; with CFG off, 3 (odd: one rank's share is padded). No sequence parallelism (refused).
    ltx_args = dict(ltx.SMALL, prompt="a red cat plays a drum", seed=4)
    out += [{"name": name, "model": folders[model], "engine": {}, "generate": dict(ltx_args, **extra), "image": None,
             "layouts": ["cfg"]} for name, model, extra in (
        ("ltx2_all_guidance", "ltx2", {}), ("ltx23_no_cfg", "ltx23", dict(guidance_scale=1.0, audio_guidance_scale=1.0)))]
    # image-to-image and inpainting compositions on the same loaded checkpoints
    out.append({"name": "flux_dev_inpaint", "model": folders["flux_dev"], "engine": {},
                "generate": dict(specs[0][2], num_inference_steps=3, strength=0.8), "image": [48, 48, 5],
                "mask": [48, 48]})
    out.append({"name": "flux2_klein_inpaint", "model": folders["flux2_klein_base"], "engine": {},  # picture = reference
                "generate": dict(prompt="a red ball", num_inference_steps=3, guidance_scale=3.0, max_sequence_length=16,
                                 strength=0.8, seed=3), "image": [64, 64, 7], "mask": [64, 64]})
    out.append({"name": "qwen_t2i_img2img", "model": folders["qwen_t2i"], "engine": {},
                "generate": dict(specs[2][2], num_inference_steps=3, strength=0.7), "image": [40, 96, 6]})
    # the step cache takes the same skip decision on every rank (and as in one process)
    out.append({"name": "flux_dev_fbcache", "model": folders["flux_dev"], "engine": {"cache": "fbcache",
                "cache_threshold": 0.5}, "generate": dict(specs[0][2], num_inference_steps=6), "image": None})
    return out


@pytest.fixture(scope="module")
def references(cases):
    """One-process outputs and step-cache stats, computed here."""
    refs = {}
    for case in cases:
        output, info, _ = run_case(case)
        refs[case["name"]] = (output, info)
    return refs


def _launch(nproc: int, cases: list, engine: dict, out: Path) -> None:
    cases = [dict(c, engine={**c["engine"], **engine}) for c in cases]
    spec = out / "cases.json"
    out.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "diffcore.testing.parallel", str(spec), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_equals_one_process(layout, cases, references, tmp_path):
    nproc, engine = LAYOUTS[layout]
    cases = [c for c in cases if layout in c.get("layouts", LAYOUTS)]
    _launch(nproc, cases, engine, tmp_path)
    report = []
    for case in cases:
        name = case["name"]
        want, ref_info = references[name]
        outputs = [np.load(tmp_path / f"{name}.rank{r}.npy") for r in range(nproc)]
        infos = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(nproc)]
        stats = infos[0]["parallel_stats"]  # the parallel paths really ran
        assert stats["all_to_all"] > 0 if engine.get("sp_degree", 1) > 1 else stats["all_to_all"] == 0, (name, stats)
        assert stats["branch_gathers"] > 0 if engine.get("cfg_parallel") else stats["branch_gathers"] == 0, (name, stats)
        for r in range(1, nproc):  # every rank returns the same result
            assert np.array_equal(outputs[r], outputs[0]), f"{name}: rank {r} differs from rank 0"
        got = outputs[0]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        diff, quality = max_abs_diff(got, want), psnr(got, want)
        report.append(f"{layout} {name}: max|diff|={diff:.2e} psnr={quality:.1f} dB")
        assert diff <= 1e-4 and quality >= 60, report[-1]
        if ref_info["cache_stats"] is not None:
            stats = [i["cache_stats"] for i in infos]
            # an sp group's ranks skip together; a CFG-parallel rank runs one branch of the one-process calls
            assert ref_info["cache_stats"]["skipped"] > 0, "threshold too low: the test would not see a skip"
            branches = 2 if engine.get("cfg_parallel") else 1
            for s in stats:
                total = {k: sum(t[k] for t in stats) * branches // len(stats) for k in s}
                assert total == ref_info["cache_stats"], (name, stats, ref_info["cache_stats"])
    print("\n".join(report))
