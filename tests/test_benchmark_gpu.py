"""benchmarks/gpu.py: skips cleanly without a GPU, and its whole flow runs on tiny configs on the CPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu

    return gpu


def test_skips_cleanly_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine
    assert _gpu_module().main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu.json").read_text())["skipped"].startswith("no CUDA device")


def test_tiny_run_on_the_cpu_measures_every_variant_it_can(tmp_path):
    gpu = _gpu_module()
    assert gpu.main(["--tiny", "--device", "cpu", "--no-compile", "--steps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu-tiny.json").read_text())["rows"]
    by = {(r["family"], r["engine"], r["variant"].split(" (")[0]): r for r in rows}
    for family in ("flux", "wan", "klein4b", "ltx", "zimage"):  # klein4b: FLUX.2 with a reference; ltx: video + audio
        assert by[(family, "diffusers", "eager")]["step_s"] > 0
        assert by[(family, "diffcore", "eager")]["psnr_vs_diffusers_db"] > 35  # same weights, bf16 noise only
        assert by[(family, "diffcore", "offload=layers")]["step_s"] > 0
        assert "skipped" in by[(family, "diffcore", "fp8")]  # no fp8-capable GPU here
    assert "| flux | diffcore | eager |" in (tmp_path / "gpu-tiny.md").read_text()
