"""benchmarks/previews.py runs end to end on a small size (its numbers are in benchmarks/README.md)."""
from __future__ import annotations

import json


def test_previews_benchmark_runs(tmp_path):
    from benchmarks import previews

    out = previews.main(["--size", "64", "--runs", "1", "--skip-demo", "--out", str(tmp_path / "p.json")])
    assert out["vae"]["factor"] == 1 and out["vae"]["full_s"] > 0  # 64 px: under PREVIEW_SIDE, a full decode
    assert json.loads((tmp_path / "p.json").read_text())["vae"]["size"] == 64
