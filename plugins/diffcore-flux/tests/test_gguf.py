"""FLUX transformer from GGUF files (Q8_0, Q5_K, Q4_K): parity with diffusers on the same file; end to end.

Files in BFL's original layout (``flux1-dev.safetensors``, city96's ``flux1-dev-Q4_K_S.gguf`` and the other community
GGUFs): diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` assumes FLUX.1's width (3072) when it splits
the single blocks' ``linear1``, so it cannot read a tiny original-layout file. The oracle is therefore in two parts:
(1) at FLUX.1-dev's real widths, on tensors whose rows are tagged by index, diffcore's conversion puts every row
where diffusers' converter does; (2) on tiny Q8_0 / K-quant files, the original-layout file loaded by diffcore
holds the same packed bytes as the Diffusers-layout file of the same weights (quantization is per row, so fusing
rows changes no block), and its output matches diffusers running that Diffusers-layout GGUF file.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")

import diffusers  # noqa: E402  (the test oracle)
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402
from diffusers.models.model_loading_utils import load_gguf_checkpoint  # noqa: E402
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor  # noqa: E402

from diffcore.errors import WeightMismatchError  # noqa: E402
from diffcore.loader.gguf_io import GGUFFile, GGUFWeight  # noqa: E402
from diffcore.loader.safetensors_io import load_into_module, skip_init  # noqa: E402
from diffcore.testing.gguf import assert_gguf_parity, check_gguf_parity, diffusers_reference, write_gguf  # noqa: E402
from diffcore.testing.key_layouts import assert_converts_like, tagged  # noqa: E402
from diffcore.testing.weights import perturb_  # noqa: E402
from diffcore_flux.key_layouts import LAYOUTS  # noqa: E402
from diffcore_flux.transformer import FluxTransformer2DModel  # noqa: E402

ORACLE_GGUF = (load_gguf_checkpoint, dequantize_gguf_tensor)  # diffusers' own GGUF reader and dequantizer

# widths that are multiples of 256, so K-quant blocks fit most weights
CFG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
           joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(5.0), indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(2, 15, 64, generator=g), encoder_hidden_states=torch.randn(2, 7, 256, generator=g),
                pooled_projections=torch.randn(2, 256, generator=g), timestep=torch.tensor([0.3, 0.8]),
                guidance=torch.tensor([3.5, 2.0]), img_ids=ids, txt_ids=torch.zeros(7, 3))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_K", "Q4_K"])
def test_gguf_transformer_matches_diffusers_on_the_same_file(qtype, tmp_path):
    r = check_gguf_parity(FluxTransformer2DModel, diffusers.FluxTransformer2DModel, CFG, _inputs(), tmp_path, qtype, ORACLE_GGUF)
    print(f"flux {qtype}: {r}")
    assert_gguf_parity(r, min_quantized=20)


def test_pipeline_loads_transformer_from_gguf(flux_folders, tmp_path):
    from safetensors.torch import load_file

    from diffcore import DiffGenerator
    from diffcore.errors import ConfigError

    folder = flux_folders["dev"]
    state = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    written = write_gguf(state, tmp_path / "t.gguf", "Q8_0")
    kw = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, output_type="np")
    base = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False).generate(**kw).output
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, gguf=tmp_path / "t.gguf")
    packed = [n for n, p in gen.components["transformer"].named_parameters() if isinstance(p, GGUFWeight)]
    assert len(packed) == sum(v == "Q8_0" for v in written.values()) > 10
    out = gen.generate(**kw).output
    mse = float(((out - base) ** 2).mean())
    assert 0 < mse < 1e-3, mse  # Q8_0: close to the full-precision output, not equal
    with pytest.raises(ConfigError, match="gguf names component"):
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, gguf={"transformer_3": tmp_path / "t.gguf"})


# ---- BFL original layout ----

def _tagged_bfl(prefix: str, layers: int = 2) -> dict[str, torch.Tensor]:
    """FLUX.1-dev's original keys at its real row counts, each tensor ``(rows, 1)`` (or ``(rows,)``) of unique ids."""
    d, mlp, rows = 3072, 12288, {}
    for s in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
              "guidance_in.in_layer", "guidance_in.out_layer"):
        rows[s] = d
    rows.update({"final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * d})
    norms = []
    for i in range(layers):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}_"
            rows.update({b + "mod.lin": 6 * d, b + "attn.qkv": 3 * d, b + "attn.proj": d, b + "mlp.0": mlp, b + "mlp.2": d})
            norms += [f"{b}attn.norm.query_norm.scale", f"{b}attn.norm.key_norm.scale"]
        b = f"single_blocks.{i}."
        rows.update({b + "linear1": 3 * d + mlp, b + "linear2": d, b + "modulation.lin": 3 * d})
        norms += [b + "norm.query_norm.scale", b + "norm.key_norm.scale"]
    shapes = {f"{s}.weight": (n, 1) for s, n in rows.items()} | {f"{s}.bias": (n,) for s, n in rows.items()}
    return tagged({prefix + k: shape for k, shape in (shapes | {k: (128,) for k in norms}).items()})


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_mapping_equals_diffusers_converter(prefix):
    sd = _tagged_bfl(prefix)
    ref = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert_converts_like(sd, ref, LAYOUTS, LAYOUTS[1])
    with skip_init():
        model = FluxTransformer2DModel.from_config(dict(num_layers=2, num_single_layers=2, guidance_embeds=True), device="meta")
    assert set(ref) == set(model.state_dict())


def to_bfl(state: dict[str, torch.Tensor], layers: int = 1, single: int = 1) -> dict[str, torch.Tensor]:
    """A Diffusers-named FLUX state dict in BFL's layout: part (1) proves the loader's inverse of this."""
    sd, out = dict(state), {}

    def put(orig, name, *parts):
        for p in ("weight", "bias"):
            if f"{name}.{p}" in sd or parts:
                out[f"{orig}.{p}"] = torch.cat([sd.pop(f"{n}.{p}") for n in (parts or (name,))])

    for orig, name in [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out")] + [
            (f"{o}_in.{a}", f"time_text_embed.{t}_embedder.linear_{j}") for o, t in
            (("time", "timestep"), ("vector", "text"), ("guidance", "guidance")) for a, j in (("in_layer", 1), ("out_layer", 2))]:
        put(orig, name)
    for p in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    for i in range(layers):
        o, n = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        put(o + "img_attn.qkv", None, *(n + f"attn.to_{c}" for c in "qkv"))
        put(o + "txt_attn.qkv", None, *(n + f"attn.add_{c}_proj" for c in "qkv"))
        for a, b in [("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"), ("img_attn.proj", "attn.to_out.0"),
                     ("txt_attn.proj", "attn.to_add_out"), ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                     ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")]:
            put(o + a, n + b)
        for a, b in [("img_attn", "norm_"), ("txt_attn", "norm_added_")]:
            out[f"{o}{a}.norm.query_norm.scale"] = sd.pop(f"{n}attn.{b}q.weight")
            out[f"{o}{a}.norm.key_norm.scale"] = sd.pop(f"{n}attn.{b}k.weight")
    for i in range(single):
        o, n = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        put(o + "linear1", None, *(n + f"attn.to_{c}" for c in "qkv"), n + "proj_mlp")
        put(o + "linear2", n + "proj_out")
        put(o + "modulation.lin", n + "norm.linear")
        out[o + "norm.query_norm.scale"] = sd.pop(n + "attn.norm_q.weight")
        out[o + "norm.key_norm.scale"] = sd.pop(n + "attn.norm_k.weight")
    assert not sd, sorted(sd)  # every tensor placed
    return out


def _ours(path):
    with skip_init():
        model = FluxTransformer2DModel.from_config(dict(CFG), device="meta")
    return load_into_module(model, [path], dtype=torch.float32).eval()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_bfl_gguf_is_the_diffusers_gguf_and_matches_diffusers(qtype, tmp_path):
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**CFG).eval()
    perturb_(ref, 0)
    written = write_gguf(ref.state_dict(), tmp_path / "diffusers.gguf", qtype)
    write_gguf({f"model.diffusion_model.{k}": v for k, v in to_bfl(ref.state_dict()).items()}, tmp_path / "bfl.gguf", qtype)
    ours = _ours(tmp_path / "bfl.gguf")
    same_file = GGUFFile(tmp_path / "diffusers.gguf")
    params = dict(ours.named_parameters())
    packed = [n for n, p in params.items() if isinstance(p, GGUFWeight)]
    assert sorted(packed) == sorted(n for n, t in written.items() if t == qtype)  # split and swapped, still packed
    for name in packed:  # byte for byte the blocks of the Diffusers-layout file
        assert params[name].logical_shape == same_file.shape(name)
        assert torch.equal(params[name].packed(), same_file.tensor(name).packed()), name
    with torch.no_grad():
        got = ours(**_inputs())
        plain = _ours(tmp_path / "diffusers.gguf")(**_inputs())
        theirs = diffusers_reference(diffusers.FluxTransformer2DModel, CFG, tmp_path / "diffusers.gguf",
                                     (load_gguf_checkpoint, dequantize_gguf_tensor))(**_inputs(), return_dict=False)[0]
        full = ref(**_inputs(), return_dict=False)[0]

    def err(a, b):
        return float((a - b).abs().max() / b.abs().max())

    print(f"flux BFL {qtype}: vs diffusers {err(got, theirs):.2e}, vs unquantized {err(got, full):.2e}")
    assert torch.equal(got, plain)
    assert err(got, theirs) < 5e-3  # diffusers dequantizes with fp16 scales (see gguf_io)
    assert 1e-4 < err(got, full) < 0.2


def test_pipeline_takes_bfl_files(flux_folders, tmp_path):
    """BFL's ``flux1-dev.safetensors`` layout (plain tensors: the same output bit for bit, also inside a full
    checkpoint with other components' keys) and a city96-style Q8_0 GGUF (close)."""
    from safetensors.torch import load_file, save_file

    from diffcore import DiffGenerator

    folder = flux_folders["dev"]
    state = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    with skip_init():
        model = FluxTransformer2DModel.from_config(json.loads((folder / "transformer" / "config.json").read_text()), device="meta")
    bfl = to_bfl(state, len(model.transformer_blocks), len(model.single_transformer_blocks))
    save_file(bfl, tmp_path / "flux1-dev-tiny.safetensors")
    full = {f"model.diffusion_model.{k}": v for k, v in bfl.items()} | {"first_stage_model.decoder.conv_in.weight": torch.zeros(4)}
    save_file(full, tmp_path / "flux1-dev-tiny-full.safetensors")
    write_gguf(bfl, tmp_path / "flux1-dev-tiny-Q8_0.gguf", "Q8_0")
    kw = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, output_type="np")
    base = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False).generate(**kw).output
    for name in ("flux1-dev-tiny.safetensors", "flux1-dev-tiny-full.safetensors"):
        gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, gguf=tmp_path / name)
        assert (gen.generate(**kw).output == base).all(), name
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, gguf=tmp_path / "flux1-dev-tiny-Q8_0.gguf")
    assert sum(isinstance(p, GGUFWeight) for p in gen.components["transformer"].parameters()) > 10
    mse = float(((gen.generate(**kw).output - base) ** 2).mean())
    assert 0 < mse < 1e-3, mse


def test_unknown_keys_name_the_layouts_tried(tmp_path):
    write_gguf({"blocks.0.mixer.in_proj.weight": torch.zeros(64, 32), "lm_head.weight": torch.zeros(32, 32)},
               tmp_path / "other.gguf", "Q8_0")
    with pytest.raises(WeightMismatchError) as e:
        _ours(tmp_path / "other.gguf")
    msg = str(e.value)
    assert "blocks.0.mixer.in_proj.weight" in msg and "time_text_embed.timestep_embedder.linear_1.weight" in msg, msg  # unexpected, missing
    assert "match none of the checkpoint layouts FluxTransformer2DModel reads (FLUX Diffusers names, FLUX original (BFL))" in msg, msg
