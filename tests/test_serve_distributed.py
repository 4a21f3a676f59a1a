"""The rank-0 / follower protocol of `diffcore serve` under torchrun (diffcore.serve.distributed), in one process:
a loopback channel runs the follower's side on a second copy of the toy model for every call rank 0
broadcasts. (The real torchrun servers are tests/test_serve_parallel.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from diffcore import DiffGenerator
from diffcore.errors import EngineShutdownError
from diffcore.serve import distributed

KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2)


class Loopback:
    """Rank 0's channel; each broadcast call is run by ``follow`` on the follower's generator at report time."""

    rank, world_size = 0, 2

    def __init__(self, follower, tamper=None):
        self.follower, self.tamper = follower, tamper
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)

    def report(self, mine) -> list:
        follower_side = _Once(self.sent[-1])
        assert distributed.follow(self.follower, follower_side) == 0
        theirs = follower_side.reported
        return [mine, self.tamper(theirs) if self.tamper else theirs]


class _Once:
    rank, world_size = 1, 2

    def __init__(self, message):
        self.messages = [message, ("ping", None), ("stop", None)]
        self.reported = "nothing reported"

    def receive(self):
        return self.messages.pop(0)

    def report(self, outcome):
        self.reported = outcome


@pytest.fixture
def follower(toy_folder, toy_manager):
    return DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager)


def leader_of(toy_gen, channel):
    return distributed.Leader(toy_gen, channel, heartbeat_s=3600)  # no pings in the way


def test_each_batch_runs_on_every_rank_and_rank0_answers(toy_gen, follower):
    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    steps = []
    with leader.make_runner(max_batch_size=4, max_wait_ms=200) as runner:
        futures = [runner.submit(dict(KW, seed=s), on_step=lambda i, n: steps.append(i)) for s in range(3)]
        results = [f.result(60) for f in futures]
    for s, result in enumerate(results):
        np.testing.assert_allclose(result.output, toy_gen.generate(**KW, seed=s).output, atol=1e-5)
    batches = [payload for name, payload in channel.sent if name == "batch"]
    assert sum(len(b) for b in batches) == 3 and all(k["seed"] in (0, 1, 2) for b in batches for k in b)
    assert all("callback" not in k for b in batches for k in b)  # functions stay on rank 0
    assert steps and max(steps) == 2  # progress is reported on rank 0
    leader.stop()
    assert channel.sent[-1] == ("stop", None)


def test_video_jobs_report_progress_and_finish_through_the_broadcast_runner(toy_gen, follower):
    import time

    from diffcore.serve.files import FileStore
    from diffcore.serve.jobs import VideoJobs

    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    runner, files = leader.make_runner(max_wait_ms=0), FileStore(60)
    progress = []
    jobs = VideoJobs(runner, files, "toy", 4, lambda result, path: path.write_bytes(b"mp4"),
                     on_step=lambda step, steps: progress.append((step, steps)))
    job = jobs.create(dict(KW, seed=2), "32x32", None)
    deadline = time.monotonic() + 60
    while job.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.status == "completed" and job.progress == 100, job.error
    assert progress == [(1, 2), (2, 2)]  # rank 0's steps, reported as they happen
    assert [m[0] for m in channel.sent] == ["batch"] and channel.sent[0][1][0]["seed"] == 2
    leader.stop()
    jobs.close()
    files.close()


def test_a_request_another_rank_ended_differently_fails_with_a_clear_error(toy_gen, follower):
    channel = Loopback(follower, tamper=lambda outcomes: [outcomes[0], "RuntimeError"])
    with leader_of(toy_gen, channel).make_runner(max_batch_size=2, max_wait_ms=500) as runner:
        first, second = runner.submit(dict(KW, seed=0)), runner.submit(dict(KW, seed=1))
        assert first.result(60).output is not None
        with pytest.raises(distributed.RanksDisagreeError, match=r"rank 0: ok, rank 1: RuntimeError"):
            second.result(60)


def test_a_request_that_fails_inside_generation_fails_alike_on_every_rank(toy_gen, follower):
    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    with pytest.raises(Exception, match="nope"):  # an unknown adapter: raised in the pipeline, on both ranks
        leader.generate(**KW, loras={"nope": 1.0})
    assert channel.sent[-1][0] == "batch"
    assert leader.generate(**KW, seed=4).output is not None  # still in step


def test_an_uploaded_lora_travels_to_every_rank_and_leaves_with_unload(toy_gen, follower, tmp_path):
    from test_serve_loras import lora_file

    path = tmp_path / "upload.safetensors"
    path.write_bytes(lora_file(toy_gen.components["transformer"]))
    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    assert leader.load_lora(path, name="style") == "style"
    name, payload = channel.sent[-1]
    assert name == "load_lora" and payload["file"] == ("upload.safetensors", path.read_bytes())  # bytes, not a path
    assert list(follower.loras) == ["style"] == list(toy_gen.loras)
    styled = leader.generate(**KW, loras={"style": 0.8})
    np.testing.assert_allclose(styled.output, follower.generate(**KW, loras={"style": 0.8}).output, atol=1e-5)
    leader.unload_lora("style")
    assert not follower.loras and not toy_gen.loras


def test_after_stop_nothing_is_broadcast(toy_gen, follower):
    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    leader.stop()
    leader.stop()
    assert channel.sent == [("stop", None)]
    with pytest.raises(EngineShutdownError):
        leader.generate(**KW)


def test_the_heartbeat_pings_an_idle_channel(toy_gen, follower):
    import time

    channel = Loopback(follower)
    leader = distributed.Leader(toy_gen, channel, heartbeat_s=0.05)
    deadline = time.monotonic() + 10
    while ("ping", None) not in channel.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    leader.stop()
    assert ("ping", None) in channel.sent and channel.sent[-1] == ("stop", None)


def test_serve_under_torchrun_needs_a_parallel_layout(monkeypatch, capsys):
    from diffcore.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "--model", "demo"]) == 2
    assert "launched as 2 processes but --sp-degree 1 without --cfg-parallel" in capsys.readouterr().err
    assert main(["serve", "--model", "demo", "--cfg-parallel", "--replicas", "2"]) == 2
    assert "do not start torchrun groups" in capsys.readouterr().err
