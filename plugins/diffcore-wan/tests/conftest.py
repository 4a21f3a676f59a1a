"""Fixtures: tiny Wan checkpoints (built with diffusers, perturbed, saved in Diffusers format)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wan_testlib import KINDS, build_wan_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def wan_folders(tmp_path_factory):
    """{kind: folder} of saved tiny checkpoints (t2v21, t2v22, ti2v, i2v21, i2v22)."""
    root = tmp_path_factory.mktemp("wan")
    out = {}
    for kind in KINDS:
        build_wan_pipeline(kind).save_pretrained(root / kind)
        out[kind] = root / kind
    return out
