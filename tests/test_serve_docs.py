"""docs/serve.md's `bash serve` (curl) and `python serve` (openai client) examples, run against real servers:
the bundled demo model, and a tiny FLUX.1-Kontext for the `serve=edit` ones."""
from __future__ import annotations

import json
import shutil
import subprocess
import traceback

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
pytest.importorskip("openai")
pytest.importorskip("diffcore_demo", reason="the examples serve the bundled demo model")
pytest.importorskip("diffcore_flux", reason="the edit examples serve a tiny FLUX.1-Kontext")

from test_docs import DOCS, blocks, is_serve_example  # noqa: E402

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_image, running_server  # noqa: E402

SHOWN = "http://127.0.0.1:30010"


def _edit_model(root):
    from diffcore.testing.checkpoints import save_component, tiny_autoencoder_kl
    from diffcore_flux.testing import write_tiny_flux

    folder = write_tiny_flux(root / "edit-model", vae_blocks=(4, 4, 4, 4))  # 4-channel VAE: Kontext encodes ~1 MP
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    shutil.rmtree(folder / "vae")
    save_component(tiny_autoencoder_kl(block_out_channels=(4, 4, 4, 4), seed=2), folder / "vae")
    return folder


def test_serve_examples_run(tmp_path, monkeypatch):
    from PIL import Image

    from diffcore import DiffGenerator

    examples = [b for b in blocks(DOCS / "serve.md") if is_serve_example(b)]
    assert {b.lang for b in examples} == {"bash", "python"} and any("serve" in b.options for b in examples)
    work = tmp_path / "work"
    work.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(work / "input.png")
    monkeypatch.chdir(work)
    demo = DiffGenerator.from_pretrained("demo", progress=False)
    kontext = DiffGenerator.from_pretrained(_edit_model(tmp_path), dtype="float32", progress=False)
    namespace: dict = {"__name__": "docs_serve"}
    with running_server(demo, ServeSettings(served_model_name="demo")) as (demo_url, _), \
            running_server(kontext, ServeSettings(served_model_name="edit-model")) as (edit_url, _):
        for block in examples:
            code = block.code.replace(SHOWN, edit_url if block.options.get("serve") == "edit" else demo_url)
            if block.lang == "bash":
                run = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, capture_output=True, text=True,
                                     timeout=300)
                assert run.returncode == 0, f"{block.where}: rc={run.returncode}\n{run.stdout}\n{run.stderr}"
                assert "error" not in run.stdout, f"{block.where}: {run.stdout}"
            else:
                try:
                    exec(compile(code, block.where, "exec"), namespace)
                except Exception:
                    pytest.fail(f"example at {block.where} failed:\n{traceback.format_exc()}", pytrace=False)
    for name, size in {"circle.png": 64, "square-0.webp": 64, "square-1.webp": 64, "edited.png": 32, "streamed.png": 64,
                       "partial-0.png": 64, "partial-1.png": 64}.items():
        assert decode_image((work / name).read_bytes()).shape == (size, size, 3), name
