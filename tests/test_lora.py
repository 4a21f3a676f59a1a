"""LoRA in the core, on the toy model: files and sources, scales as PEFT computes them, per-request
selection (also from concurrent threads), fuse / unfuse / unload, and every refusal leaving the base
model untouched."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffcore.errors import LoraError, LoraFormatError, LoraNotFoundError, LoraShapeError, SamplingParamError
from diffcore.lora.adapter import parse_peft_layout

KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="np")
LAYERS = ["blocks.0.attn1.to_q", "blocks.0.attn2.to_v", "blocks.0.ff.0", "blocks.0.mod", "proj_out"]


def _lora(model, layers=LAYERS, rank=3, seed=0, std=0.5, alpha=None, prefix="transformer."):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in layers:
        layer = model.get_submodule(name)
        state[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * std
        state[f"{prefix}{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * std
        if alpha is not None:
            state[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    return state


@pytest.fixture
def gen(toy_folder, toy_manager):
    from diffcore import DiffGenerator

    return DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager)


@pytest.fixture
def files(gen, tmp_path):
    model = gen.components["transformer"]
    out = {}
    for name, seed in (("style", 1), ("detail", 2)):
        out[name] = tmp_path / f"{name}.safetensors"
        save_file(_lora(model, seed=seed, rank=2 + seed), out[name])
    return out


def _run(gen, **kw):
    return gen.generate(**KW, seed=3, **kw).output


def test_selection_is_per_request_and_fuse_unfuse_is_exact(gen, files):
    base = _run(gen)
    assert gen.load_lora(files["style"]) == "style" and gen.load_lora(files["detail"]) == "detail"
    info = gen.loras["style"]
    assert info.ranks == (3,) and info.targets == tuple(sorted(LAYERS)) and info.fused is None
    assert np.array_equal(_run(gen), base) and np.array_equal(_run(gen, loras={}), base)
    one, two = _run(gen, loras={"style": 0.8}), _run(gen, loras={"style": 0.8, "detail": -0.5})
    assert not np.allclose(one, base, atol=1e-3) and not np.allclose(one, two, atol=1e-3)
    assert np.array_equal(_run(gen, loras={"style": 0.0}), base)
    gen.fuse_lora({"style": 0.8, "detail": -0.5})
    assert gen.loras["detail"].fused == -0.5
    np.testing.assert_allclose(_run(gen), two, atol=1e-5)
    with pytest.raises(LoraError, match="'style'.*fused"):
        _run(gen, loras={"style": 1.0})
    with pytest.raises(LoraError, match="unfuse_lora"):
        gen.unload_lora("style")
    gen.unfuse_lora()
    assert np.array_equal(_run(gen), base)  # bit for bit
    gen.unload_lora("detail")
    assert list(gen.loras) == ["style"] and np.array_equal(_run(gen, loras={"style": 0.8}), one)
    with pytest.raises(LoraNotFoundError, match="'detail'"):
        _run(gen, loras={"detail": 1.0})


def test_fused_weights_change_by_exactly_the_scaled_product(gen, tmp_path):
    layer = gen.components["transformer"].get_submodule("proj_out")
    w0 = layer.weight.detach().clone()
    state = _lora(gen.components["transformer"], ["proj_out"], rank=2, alpha=5)
    save_file(state, tmp_path / "x.safetensors")
    gen.load_lora(tmp_path / "x.safetensors")
    gen.fuse_lora({"x": 0.5})
    a, b = state["transformer.proj_out.lora_A.weight"], state["transformer.proj_out.lora_B.weight"]
    torch.testing.assert_close(layer.weight.to_dense(), w0 + 0.5 * 2.5 * (b @ a), rtol=0, atol=1e-6)
    gen.unfuse_lora()
    assert torch.equal(layer.weight.to_dense(), w0)


def test_concurrent_requests_with_different_loras_equal_their_solo_runs(gen, files):
    for path in files.values():
        gen.load_lora(path)
    selections = [None, {"style": 1.0}, {"detail": 0.7}, {"style": -0.4, "detail": 1.2}]
    solo = [_run(gen, loras=s) for s in selections]
    results, errors = {}, []

    def worker(t):
        try:
            for i in range(6):
                k = (t + i) % len(selections)
                results[(t, i)] = (k, _run(gen, loras=selections[k]))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(results) == 18
    for k, out in results.values():
        assert np.array_equal(out, solo[k]), f"selection {selections[k]} differs from its solo run"


def test_sources_folder_weight_name_and_refusals(gen, files, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    model = gen.components["transformer"]
    save_file(_lora(model), folder / "one.safetensors")
    assert gen.load_lora(folder) == "one"  # a folder with a single file
    save_file(_lora(model, seed=5), folder / "two.safetensors")
    with pytest.raises(LoraFormatError, match="several .safetensors.*weight_name"):
        gen.load_lora(folder, name="x")
    assert gen.load_lora(folder, name="second", weight_name="two.safetensors") == "second"
    with pytest.raises(LoraError, match="already loaded"):
        gen.load_lora(folder, name="second", weight_name="two.safetensors")
    torch.save(_lora(model), tmp_path / "p.bin")
    with pytest.raises(LoraFormatError, match="pickle"):
        gen.load_lora(tmp_path / "p.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraFormatError, match="'bad'.*corrupt"):
        gen.load_lora(tmp_path / "bad.safetensors")
    with pytest.raises(LoraFormatError, match="neither a file"):
        gen.load_lora(tmp_path / "missing.safetensors")


def test_hub_ids_resolve_through_the_cache_with_weight_name(gen, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraFormatError, match="org/style-lora.*not in the Hugging Face cache"):
        gen.load_lora("org/style-lora", weight_name="lora.safetensors")
    with pytest.raises(LoraFormatError, match="pass weight_name"):
        gen.load_lora("org/style-lora")


def test_bad_adapters_are_refused_and_change_nothing(gen, files, tmp_path):
    base = _run(gen)
    model = gen.components["transformer"]
    gen.load_lora(files["style"])
    cases = {
        "unmatched": ({**_lora(model), "transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
                       "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}, LoraFormatError,
            "match no layer.*blocks.7.attn1.to_q"),
        "wide": ({"transformer.proj_out.lora_A.weight": torch.zeros(2, 64),
                  "transformer.proj_out.lora_B.weight": torch.zeros(16, 2)}, LoraShapeError, "'wide'.*proj_out"),
        "te": ({**_lora(model), "text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight": torch.zeros(2, 32)},
               LoraFormatError, "text encoder.*ignore_text_encoder"),
        "odd": ({"transformer.proj_out.weird": torch.zeros(2)}, LoraFormatError, "no LoRA layout"),
        "half": ({"transformer.proj_out.lora_A.weight": torch.zeros(2, 32)}, LoraFormatError, "no lora_B"),
        "norm": ({"transformer.norm_out.lora_A.weight": torch.zeros(2, 32),
                  "transformer.norm_out.lora_B.weight": torch.zeros(32, 2)}, LoraFormatError, "not linear layers"),
        "dora": ({**_lora(model), "transformer.proj_out.lora_magnitude_vector": torch.ones(16)}, LoraFormatError, "DoRA"),
    }
    for name, (state, error, match) in cases.items():
        save_file(state, tmp_path / f"{name}.safetensors")
        with pytest.raises(error, match=match):
            gen.load_lora(tmp_path / f"{name}.safetensors")
        assert name not in gen.loras
    with pytest.raises(LoraNotFoundError, match="'nope'.*loaded: style"):
        _run(gen, loras={"nope": 1.0})
    for weight in (math.nan, math.inf, "1"):
        with pytest.raises(SamplingParamError, match="'style'"):
            _run(gen, loras={"style": weight})
        with pytest.raises(LoraError, match="'style'.*finite"):
            gen.fuse_lora({"style": weight})
    assert gen.loras["style"].fused is None
    assert np.array_equal(_run(gen), base)
    te = tmp_path / "te.safetensors"
    assert gen.load_lora(te, ignore_text_encoder=True) == "te"  # the denoiser part, when asked


def test_scales_follow_peft_metadata_alphas_and_defaults():
    a, b = torch.ones(4, 8), torch.ones(6, 4)
    def state(*mods, alpha=None):
        out = {}
        for m in mods:
            out[f"transformer.{m}.lora_A.weight"], out[f"transformer.{m}.lora_B.weight"] = a, b
            if alpha and m in alpha:
                out[f"transformer.{m}.alpha"] = torch.tensor(alpha[m])
        return out

    scales = lambda layers: {m: lw.scale for m, lw in layers.items()}  # noqa: E731
    assert scales(parse_peft_layout(state("x.q", "y.q"), {}, "t")) == {"x.q": 1.0, "y.q": 1.0}  # alpha = rank
    # .alpha tensors; a layer without one takes the most common alpha (diffusers' get_peft_kwargs)
    got = scales(parse_peft_layout(state("x.q", "y.q", "z.q", alpha={"x.q": 8.0, "y.q": 8.0}), {}, "t"))
    assert got == {"x.q": 2.0, "y.q": 2.0, "z.q": 2.0}
    meta = {"r": 4, "lora_alpha": 2, "alpha_pattern": {"^y.q": 12, "z.q": 6}, "rank_pattern": {}}
    got = scales(parse_peft_layout(state("x.q", "y.q", "z.q", "a.z.q"), meta, "t"))
    assert got == {"x.q": 0.5, "y.q": 3.0, "z.q": 1.5, "a.z.q": 1.5}  # "^" anchors, plain patterns match suffixes
    got = scales(parse_peft_layout(state("x.q"), {"r": 4, "lora_alpha": 8, "use_rslora": True}, "t"))
    assert got == {"x.q": 4.0}  # rsLoRA: alpha / sqrt(r)


def test_cli_lora_flag(global_manager, toy_manager, toy_folder, gen, files, tmp_path, capsys):
    from diffcore.cli import main, parse_lora

    assert parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
    global_manager(toy_manager)
    out = tmp_path / "x.png"
    args = ["generate", "--model", str(toy_folder), "--prompt", "a red circle", "--height", "32", "--width", "32",
            "--steps", "2", "--seed", "3", "--dtype", "float32", "--quiet", "--output", str(out),
            "--lora", f"{files['style']}:0.8", "--lora", str(files["detail"])]
    assert main(args) == 0, capsys.readouterr().err
    gen.load_lora(files["style"]), gen.load_lora(files["detail"])
    want = gen.generate(**{**KW, "output_type": "pil"}, seed=3, loras={"style": 0.8, "detail": 1.0}).images[0]
    from PIL import Image

    with Image.open(out) as img:
        np.testing.assert_array_equal(np.asarray(img), np.asarray(want))


def test_serve_lora_flag_loads_unapplied_or_fuses_its_weight(global_manager, toy_manager, toy_folder, gen, files):
    """``diffcore serve --lora [NAME=]PATH[:WEIGHT]``: the same syntax as generate's; without a weight the adapter
    waits for requests to pick it, with one it is fused into the weights for every request."""
    from diffcore.cli import build_parser
    from diffcore.configs.engine_flags import engine_kwargs
    from diffcore.serve.server import load_generator

    global_manager(toy_manager)
    args = build_parser().parse_args(["serve", "--dtype", "float32", "--lora", f"s={files['style']}:0.8",
                                      "--lora", f"d={files['detail']}"])
    served = load_generator(str(toy_folder), {"progress": False, **engine_kwargs(args)}, args.lora)
    assert served.loras["s"].fused == 0.8 and served.loras["d"].fused is None
    gen.load_lora(files["style"]), gen.load_lora(files["detail"])
    np.testing.assert_allclose(_run(served), _run(gen, loras={"style": 0.8}), atol=1e-5)
    np.testing.assert_allclose(_run(served, loras={"d": 0.5}), _run(gen, loras={"style": 0.8, "detail": 0.5}), atol=1e-5)


def test_per_row_weights_give_each_row_its_own_adapters(gen, files):
    """A batch whose rows come from requests with different adapters runs once, each row scaled by its
    own weights (the batching engine's case), equal to running the rows alone."""
    from diffcore.lora import lora_scope

    for path in files.values():
        gen.load_lora(path)
    model = gen.components["transformer"]
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(3, 16, 16, generator=g), torch.randn(3, 5, 32, generator=g), torch.randn(3, 32, generator=g)
    t = torch.tensor([0.3, 0.6, 0.9])
    rows = [{"style": 0.8}, {}, {"style": -0.3, "detail": 1.1}]
    with torch.no_grad():
        solo = [None] * 3
        for i, sel in enumerate(rows):
            with lora_scope(sel):
                solo[i] = model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], pooled[i:i + 1])
        weights = {n: torch.tensor([r.get(n, 0.0) for r in rows]) for n in ("style", "detail")}
        with lora_scope(weights):
            batched = model(x, t, ctx, pooled)
    torch.testing.assert_close(batched, torch.cat(solo), rtol=1e-5, atol=1e-5)  # portable F.linear rounds by batch shape


def test_hub_repo_ids_load_from_the_cache_offline(gen, files, tmp_path, monkeypatch):
    """A repo id with weight_name resolves through huggingface_hub's cache (here a hand-made snapshot)."""
    import shutil

    from huggingface_hub import constants

    snap = tmp_path / "hub" / "models--org--style-lora" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    shutil.copy(files["style"], snap / "style_v2.safetensors")
    (tmp_path / "hub" / "models--org--style-lora" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--style-lora" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = gen.load_lora("org/style-lora", weight_name="style_v2.safetensors")
    assert name == "style_v2" and gen.loras[name].source.endswith("style_v2.safetensors")
    gen.load_lora(files["style"], name="local")
    assert np.array_equal(_run(gen, loras={"style_v2": 0.5}), _run(gen, loras={"local": 0.5}))


def test_step_batch_rows_keep_their_own_adapters_and_hold_them_between_steps(gen, files):
    """A request with an adapter and one without share a step batch (joined mid-run) and each equals its solo run;
    while a request is a row its adapter cannot be unloaded, even between two steps."""
    from diffcore.engine.batching import BatchScheduler
    from diffcore.errors import LoraInUseError
    from diffcore.testing.joining import Gate, assert_join_equals_solo

    gen.load_lora(files["style"])
    styled = dict(KW, seed=3, num_inference_steps=4, loras={"style": 0.8})
    counted = assert_join_equals_solo(gen, styled, [dict(KW, seed=4, num_inference_steps=2)], at=0)
    assert max(counted["rows"]) == 2  # they shared calls, each row with its own adapters
    gate = Gate(at=0)
    with BatchScheduler(gen, max_batch_size=2, max_wait_ms=0) as scheduler:
        running = scheduler.submit(gen.request(dict(styled, callback=gate)))
        assert gate.reached.wait(timeout=60)  # between its first and second step
        with pytest.raises(LoraInUseError, match="style"):
            gen.unload_lora("style", timeout=0.2)
        gate.release.set()
        assert running.result(timeout=60).output is not None
    gen.unload_lora("style", timeout=0)  # it left: free to go
