"""Fixtures: tiny Wan checkpoints (built with diffusers, perturbed, saved in Diffusers format)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wan_testlib import KINDS, build_wan_pipeline, save_as  # noqa: E402


@pytest.fixture(scope="session")
def wan_folders(tmp_path_factory):
    """{kind: folder} of saved tiny checkpoints (t2v21, t2v22, ti2v, i2v21, i2v22)."""
    root = tmp_path_factory.mktemp("wan")
    out = {}
    for kind in KINDS:
        build_wan_pipeline(kind).save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="session")
def fewstep_folders(tmp_path_factory):
    """Tiny Wan 2.1 T2V checkpoints whose model_index says WanDMDPipeline / WanCausalDMDPipeline (the causal
    one's transformer config asks for blocks of 2 latent frames, as self-forcing configs may)."""
    root = tmp_path_factory.mktemp("fewstep")
    pipe = build_wan_pipeline("t2v21", seed=4)
    return {"dmd": save_as(pipe, root / "dmd", "WanDMDPipeline"),
            "causal": save_as(pipe, root / "causal", "WanCausalDMDPipeline", {"num_frames_per_block": 2}),
            # FastWan 2.2 TI2V-5B-like (first-frame image, per-token timesteps), TurboWan 2.2 I2V-like (two experts)
            "ti2v": save_as(build_wan_pipeline("ti2v", seed=5), root / "ti2v", "WanDMDPipeline"),
            "i2v22": save_as(build_wan_pipeline("i2v22", seed=6), root / "i2v22", "WanDMDPipeline")}
