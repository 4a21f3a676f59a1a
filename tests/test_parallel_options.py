"""Sequence / CFG parallel options: validation, errors before any weights load, the torchrun CLI path.

The equality of parallel and one-process outputs is tests/test_parallel_equality.py.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffcore import DiffGenerator, loader
from diffcore.configs.engine_args import EngineArgs
from diffcore.errors import ConfigError, ParallelConfigError


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any component is loaded: parallel layout errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a component was loaded before the parallel layout was checked")

    monkeypatch.setattr(loader, "load_component", refuse)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("value", [0, -2, 1.5, "2", True])
def test_sp_degree_must_be_a_positive_int(value):
    with pytest.raises(ConfigError, match="sp_degree must be an integer >= 1"):
        EngineArgs(sp_degree=value)


def test_world_size_is_sp_degree_times_branches():
    assert EngineArgs().world_size == 1
    assert EngineArgs(sp_degree=2).world_size == 2
    assert EngineArgs(sp_degree=2, cfg_parallel=True).world_size == 4


def test_not_launched_by_torchrun_says_how_to_launch(no_weights):
    with pytest.raises(ParallelConfigError, match=r"needs 6 processes.*torchrun --nproc-per-node 6"):
        DiffGenerator.from_pretrained("demo", sp_degree=3, cfg_parallel=True)


def test_world_size_mismatch(no_weights, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ParallelConfigError, match=r"world size sp_degree x 1 = 3, but 2 processes"):
        DiffGenerator.from_pretrained("demo", sp_degree=3)


def test_heads_must_divide_by_sp_degree(no_weights):
    with pytest.raises(ParallelConfigError, match=r"transformer has 3 attention heads.*sp_degree in \[1, 3\]"):
        DiffGenerator.from_pretrained("demo", sp_degree=2)


def test_unsupported_family_is_refused(no_weights, toy_folder, toy_manager):
    with pytest.raises(ParallelConfigError, match="does not support sequence parallelism"):
        DiffGenerator.from_pretrained(toy_folder, plugin_manager=toy_manager, sp_degree=2)


def test_cfg_parallel_needs_a_model_with_cfg(no_weights, tmp_path, monkeypatch):
    from diffcore.configs.pipeline_config import PipelineConfig
    from diffcore.parallel import check_parallel

    with pytest.raises(ParallelConfigError, match="without classifier-free guidance"):
        check_parallel(1, True, PipelineConfig(cfg="none"), tmp_path, "SomePipeline")


@pytest.mark.slow
def test_torchrun_cli_generate_rank0_writes_the_same_picture(tmp_path):
    """``torchrun --nproc-per-node 2 -m diffcore generate --cfg-parallel`` (real gloo group, the bundled demo
    model, true CFG): one file, written once, equal to the one-process picture. (The demo's 3 heads
    would need 3 ranks for sequence parallelism; that path runs under torchrun in the equality tests.)"""
    args = ["generate", "--prompt", "a red circle on a blue background", "--height", "64", "--width", "80",
            "--steps", "3", "--dtype", "float32", "--quiet"]
    single = tmp_path / "single.png"
    parallel = tmp_path / "parallel.png"
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""}
    run = lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    one = run([sys.executable, "-m", "diffcore", *args, "--output", str(single)])
    assert one.returncode == 0, one.stderr
    many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "diffcore",
                *args, "--cfg-parallel", "--output", str(parallel)])
    assert many.returncode == 0, many.stderr[-4000:]
    assert many.stdout.count("wrote ") == 1, many.stdout  # rank 0 only
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (single, parallel))
    assert a.shape == b.shape == (64, 80, 3)
    assert np.abs(a - b).max() <= 1  # 8-bit rounding of fp32 outputs that agree to ~1e-6
