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

    def close(self) -> None:
        self.closed = True


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
        futures = [runner.submit(leader.request(dict(KW, seed=s)), on_step=lambda i, n: steps.append(i)) for s in range(3)]
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
    from diffcore.serve.store import StateStore

    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    store = StateStore(None)
    runner, files = leader.make_runner(max_wait_ms=0), FileStore(store, ttl=60)
    progress = []
    mp4 = (lambda result, path: path.write_bytes(b"mp4"), "video/mp4", ".mp4")
    jobs = VideoJobs(runner, files, store, "toy", 4, 60, {"video": mp4},
                     on_step=lambda step, steps: progress.append((step, steps)))
    job = jobs.create(leader.request(dict(KW, seed=2)), "32x32", None)
    deadline = time.monotonic() + 60
    while job.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.status == "completed" and job.progress == 100, job.error
    assert progress == [(1, 2), (2, 2)]  # rank 0's steps, reported as they happen
    assert [m[0] for m in channel.sent] == ["batch"] and channel.sent[0][1][0]["seed"] == 2
    leader.stop()
    jobs.close()
    store.close()


def test_a_request_another_rank_ended_differently_fails_and_breaks_the_leader(toy_gen, follower):
    channel = Loopback(follower, tamper=lambda outcomes: [outcomes[0], "RuntimeError: boom"])
    told = []
    leader = distributed.Leader(toy_gen, channel, heartbeat_s=3600, on_broken=told.append)
    with leader.make_runner(max_batch_size=2, max_wait_ms=500) as runner:
        first, second = runner.submit(leader.request(dict(KW, seed=0))), runner.submit(leader.request(dict(KW, seed=1)))
        assert first.result(60).output is not None  # the ranks agree on it
        with pytest.raises(distributed.RanksDisagreeError, match=r"rank 0: ok; rank 1: RuntimeError: boom"):
            second.result(60)
    assert told == [leader.broken] and "request 2 of a batch of 2" in leader.broken
    sent = len(channel.sent)
    with pytest.raises(distributed.RanksOutOfStepError, match="stopping for a restart"):
        leader.generate(**KW)  # the models may differ now: nothing more reaches the other ranks
    assert len(channel.sent) == sent
    leader.stop()
    assert channel.sent[-1] == ("stop", leader.broken)


def test_a_request_that_fails_inside_generation_fails_alike_on_every_rank(toy_gen, follower, caplog):
    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    with caplog.at_level("WARNING", logger="diffcore.serve"):
        with pytest.raises(Exception, match="nope"):  # an unknown adapter: raised in the pipeline, on both ranks
            leader.generate(**KW, loras={"nope": 1.0})
    assert channel.sent[-1][0] == "batch"
    logged = [r for r in caplog.records if r.levelname == "WARNING" and "rank 1: batch failed" in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "nope" in logged[0].getMessage()  # with its traceback
    assert leader.generate(**KW, seed=4).output is not None and leader.broken is None  # still in step


def test_errors_of_one_class_with_different_messages_disagree(toy_gen, follower):
    channel = Loopback(follower, tamper=lambda outcomes: [o.replace("nope", "other") for o in outcomes])
    leader = leader_of(toy_gen, channel)
    with pytest.raises(distributed.RanksDisagreeError) as info:
        leader.generate(**KW, loras={"nope": 1.0})
    assert "LoraNotFoundError: LoRA 'nope'" in str(info.value) and "LoraNotFoundError: LoRA 'other'" in str(info.value)
    assert leader.broken == str(info.value)


def test_a_lora_change_the_ranks_disagree_on_breaks_the_leader_and_health_says_so(toy_gen, follower, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient
    from test_serve_loras import lora_file

    from diffcore.serve.app import create_app

    path = tmp_path / "style.safetensors"
    path.write_bytes(lora_file(toy_gen.components["transformer"]))
    channel = Loopback(follower, tamper=lambda outcome: "LoraError: LoRA 'style': not here")
    leader = leader_of(toy_gen, channel)
    with pytest.raises(distributed.RanksDisagreeError, match="disagree on load_lora"):
        leader.load_lora(path, name="style")
    toy_gen.unload_lora("style")  # (rank 0 loaded it; the fixture's model is shared)
    with TestClient(create_app(generator=leader), base_url="http://127.0.0.1") as client:  # a Host the server answers
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "out_of_step"
        assert "disagree on load_lora" in health.json()["detail"]
        refused = client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "out_of_step"
    assert [m[0] for m in channel.sent] == ["load_lora"]  # the request never reached rank 1


def test_a_bad_uploaded_lora_fails_alike_on_every_rank_though_each_reads_its_own_copy(toy_gen, follower, tmp_path):
    from diffcore.errors import LoraFormatError

    path = tmp_path / "upload.safetensors"
    path.write_bytes(b"not a safetensors file")
    leader = leader_of(toy_gen, Loopback(follower))
    with pytest.raises(LoraFormatError, match="cannot be read as safetensors"):  # the message names each its path
        leader.load_lora(path, name="style")
    assert leader.broken is None and not follower.loras


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


def test_a_parallel_layout_needs_its_processes_before_the_port_is_bound(monkeypatch, capsys):
    import diffcore.serve.server
    from diffcore.cli import main

    def serve(*args, **kwargs):
        raise AssertionError("serve() binds the port: the launch must be refused before")

    monkeypatch.setattr(diffcore.serve.server, "serve", serve)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["serve", "--model", "demo", "--cfg-parallel"]) == 2
    err = capsys.readouterr().err
    assert "was not started by torchrun" in err and "torchrun --nproc-per-node 2 -m diffcore serve" in err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["serve", "--model", "demo", "--sp-degree", "1", "--cfg-parallel"]) == 2
    assert "needs 2 processes" in (err := capsys.readouterr().err) and "launched as 4 processes" in err


def test_a_follower_takes_torchruns_signals_until_the_channel_exists(toy_gen, monkeypatch):
    import signal

    from diffcore.serve import torchrun

    seen = {}

    class Stops(_Once):
        def __init__(self):
            seen["channel"] = signal.getsignal(signal.SIGTERM)
            self.messages = [("stop", None)]

        def close(self):
            pass

    def load():
        seen["load"] = signal.getsignal(signal.SIGTERM)
        return toy_gen

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(torchrun, "Channel", Stops)
    try:
        assert torchrun.follow_main(load) == 0
        ignored = signal.getsignal(signal.SIGTERM)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert seen["load"] is before[signal.SIGTERM] and seen["channel"] is before[signal.SIGTERM]
    assert ignored is not before[signal.SIGTERM]  # then rank 0 decides when it stops


def test_a_server_stopped_before_its_load_thread_ran_still_stops_the_ranks(toy_gen, follower, monkeypatch):
    import threading

    from diffcore.serve import torchrun

    channel = Loopback(follower)
    monkeypatch.setattr(torchrun, "Channel", lambda: channel)
    loader = torchrun.LeaderLoader(lambda: toy_gen)
    closing = threading.Thread(target=loader.close, kwargs=dict(loading=True), daemon=True)
    closing.start()  # the lifespan started the load thread, but its first line has not run yet
    closing.join(0.2)
    assert closing.is_alive()  # waits for the load: the other ranks are loading and need a `stop`
    loader()
    closing.join(30)
    assert not closing.is_alive() and channel.sent == [("stop", None)] and channel.closed


def test_serve_exits_1_after_the_ranks_disagree(toy_gen, follower, monkeypatch):
    """serve() itself as rank 0 (the channel a loopback): the disagreeing request fails, then the server stops on
    its own, stops the other ranks and returns 1 (torchrun fails the job or restarts it)."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import threading

    import httpx

    from diffcore.serve import server, torchrun
    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.serving import free_port, wait_for

    channel = Loopback(follower, tamper=lambda outcomes: ["RuntimeError: boom"] * len(outcomes))
    monkeypatch.setattr(torchrun, "Channel", lambda: channel)
    monkeypatch.setattr(server, "load_generator", lambda *args: toy_gen)
    port, returned = free_port(), []
    thread = threading.Thread(target=lambda: returned.append(server.serve(
        "toy", ServeSettings(port=port), {"cfg_parallel": True}, log_level="warning")), daemon=True)
    thread.start()
    wait_for(f"http://127.0.0.1:{port}/health", timeout=60)
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=60,
                       json={"prompt": "x", "size": "32x32", "num_inference_steps": 2})
    assert reply.status_code == 500 and "disagree" in reply.json()["error"]["message"]
    thread.join(60)
    assert returned == [1]
    name, reason = channel.sent[-1]
    assert name == "stop" and "request 1 of a batch of 1" in reason and channel.closed


def test_a_callback_given_to_the_leader_stays_on_rank_0_and_is_called(toy_gen, follower):
    """Leader.generate_batch takes generate()'s keywords, a step callback included (it was once parsed as an
    unknown sampling parameter): the callback runs on rank 0, and only the parameters reach the other ranks."""
    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    steps = []
    result, = leader.generate_batch([dict(KW, seed=3, callback=lambda i, t, latents: steps.append(i))])
    np.testing.assert_allclose(result.output, toy_gen.generate(**KW, seed=3).output, atol=1e-5)
    assert steps == [0, 1]
    (name, payload), = channel.sent
    assert name == "batch" and payload[0]["seed"] == 3 and "callback" not in payload[0]
    leader.stop()


def test_previews_are_decoded_on_rank_0_of_a_broadcast_batch(toy_gen, follower):
    """A streamed request's preview hook stays on rank 0: the batch broadcasts its parameters only, rank 0 calls
    the hook at the chosen steps, the result equals generate()'s."""
    channel = Loopback(follower)
    leader = leader_of(toy_gen, channel)
    assert leader.can_preview
    shown = []
    kw = dict(KW, num_inference_steps=4, seed=5)
    with leader.make_runner(max_batch_size=2, max_wait_ms=10) as runner:
        req = leader.attach_previews(leader.request(kw), shown.append, 2)
        result = runner.submit(req).result(60)
    np.testing.assert_allclose(result.output, toy_gen.generate(**kw).output, atol=1e-5)
    assert [p.step for p in shown] == [1, 3] and shown[0].output.shape == (1, 32, 32, 3)
    (name, payload), = [m for m in channel.sent if m[0] == "batch"]
    assert payload[0]["seed"] == 5 and not any(callable(v) for v in payload[0].values())
    leader.stop()
