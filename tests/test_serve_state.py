"""Durable server state: `url` files and video jobs in the state folder (SQLite + files) survive a SIGKILL
and a restart on the same folder, expire after --file-ttl, and one folder serves one server at a time."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
httpx = pytest.importorskip("httpx")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.serve.store import StateFolderInUse, StateStore  # noqa: E402
from diffcore.testing.serving import free_port, openai_client, running_server, serve_process  # noqa: E402

IMAGE = {"prompt": "a red circle on a blue background", "size": "32x32", "num_inference_steps": 2, "seed": 4,
         "response_format": "url"}


@pytest.mark.skipif(not __import__("importlib").util.find_spec("diffcore_demo"), reason="needs the demo plugin")
def test_url_files_survive_sigkill_and_restart_and_one_folder_has_one_server(tmp_path):
    state = tmp_path / "state"
    first, base = serve_process("--model", "demo", "--state-dir", str(state), "--log-level", "warning")
    try:
        url = httpx.post(base + "/v1/images/generations", json=IMAGE, timeout=60).json()["data"][0]["url"]
        path = url[len(base):]
        before = httpx.get(url).content
        assert before[:8] == b"\x89PNG\r\n\x1a\n"

        second = subprocess.run([sys.executable, "-m", "diffcore.cli", "serve", "--model", "demo", "--port",
                                 str(free_port()), "--state-dir", str(state)], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2
        assert "is in use by diffcore serve (pid" in second.stderr and "--state-dir" in second.stderr
        assert httpx.get(url).content == before  # the refused server touched nothing

        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    again, base2 = serve_process("--model", "demo", "--state-dir", str(state), "--log-level", "warning")
    try:
        assert httpx.get(base2 + path).content == before  # served after the crash, from the same folder
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
    finally:
        if again.poll() is None:
            again.kill()
    kept = [p.name for p in (state / "files").iterdir()]
    assert path.rsplit("/", 1)[1] in "".join(kept)  # SIGTERM left the finished file in place


def test_in_process_lock_and_expiry_sweeper(toy_gen, tmp_path):
    """--file-ttl: expires_at is set, the sweeper deletes the file and its row; the lock refuses a second
    store on the same folder while the first is open, and is free again once it closes."""
    settings = ServeSettings(state_dir=str(tmp_path), file_ttl=1.0)
    with running_server(toy_gen, settings) as (base, app):
        with pytest.raises(StateFolderInUse, match="give this one its own --state-dir"):
            StateStore(tmp_path)
        client = openai_client(base)
        out = client.images.generate(prompt="x", size="32x32", response_format="url",
                                     extra_body={"seed": 1, "num_inference_steps": 1})
        file_id = out.data[0].url.rsplit("/", 1)[1]
        store = app.state.diffcore.store
        assert httpx.get(out.data[0].url).status_code == 200
        (name, _, expires_at), = store.execute("SELECT name, media_type, expires_at FROM files WHERE id = ?", (file_id,))
        assert 0.5 < expires_at - time.time() <= 1.0
        assert (tmp_path / "files" / name).is_file()
        deadline = time.monotonic() + 10
        while (tmp_path / "files" / name).exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # the sweeper runs every ttl/4 (at least 0.5 s)
        assert not (tmp_path / "files" / name).exists()
        assert store.execute("SELECT id FROM files") == []
        assert httpx.get(out.data[0].url).status_code == 404
    StateStore(tmp_path).close()  # the closed server released the lock


def test_orphans_from_a_cut_write_are_deleted_at_start(tmp_path):
    store = StateStore(tmp_path)
    (tmp_path / "files" / "0123.partial.mp4").write_bytes(b"half")
    assert store.remove_orphans() == 1 and list((tmp_path / "files").iterdir()) == []
    store.close()
    assert (tmp_path / "state.db").is_file()  # a state folder, not a temporary one: kept


def test_default_state_folder_is_per_port_under_the_cache(monkeypatch, tmp_path):
    from diffcore.serve.store import default_state_dir

    monkeypatch.delenv("DIFFCORE_STATE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_state_dir(30010) == tmp_path / "diffcore" / "serve" / "port-30010"
    monkeypatch.setenv("DIFFCORE_STATE_HOME", str(tmp_path / "elsewhere"))
    assert default_state_dir(8000) == tmp_path / "elsewhere" / "port-8000"
