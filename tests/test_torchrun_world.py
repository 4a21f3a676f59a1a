"""torchrun with more processes than the parallel flags explain is refused on every rank before loading
(issue 30 item 8): two ranks without parallel flags ran two independent copies that both wrote the output."""
from __future__ import annotations

import subprocess
import sys

import pytest

from diffcore import DiffGenerator
from diffcore.errors import ParallelConfigError


def test_a_world_the_flags_do_not_explain_is_refused_before_loading(toy_folder, toy_manager, monkeypatch):
    from diffcore import loader

    loaded = []
    monkeypatch.setattr(loader, "load_component", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ParallelConfigError, match="WORLD_SIZE=2.*sp_degree=1"):
        DiffGenerator.from_pretrained(toy_folder, progress=False, plugin_manager=toy_manager)
    assert not loaded
    monkeypatch.undo()
    DiffGenerator.from_pretrained(toy_folder, progress=False, plugin_manager=toy_manager)


def test_generate_under_a_two_rank_torchrun_exits_2_on_every_rank_and_writes_nothing(tmp_path):
    out = tmp_path / "x.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "diffcore.cli",
           "generate", "--model", "demo", "--prompt", "a cat", "--steps", "1", "--output", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and not out.exists()
    assert run.stderr.count("error: this process is one of 2 launched together") == 2, run.stderr[-2000:]
