"""Wan transformer from GGUF files (Q8_0, Q5_K, Q4_K): parity with diffusers on the same file.

Single files in the original Wan-Video layout (city96's Wan 2.1 / 2.2 GGUFs, the official safetensors): the key
mapping equals diffusers' ``convert_wan_transformer_to_diffusers``; on one original-layout GGUF file diffcore matches
``WanTransformer3DModel.from_single_file``; the pipeline takes such files; a FLUX file is refused. The original-layout
files are written from a tiny diffusers model, named through diffusers' own converter (run on the original key list
below, so the test holds no mapping of its own).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import diffusers  # noqa: E402  (the test oracle)
from diffusers import GGUFQuantizationConfig  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402
from diffusers.models.model_loading_utils import load_gguf_checkpoint  # noqa: E402
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor  # noqa: E402

from diffcore.errors import LoaderError  # noqa: E402
from diffcore.loader import key_layouts  # noqa: E402
from diffcore.loader.gguf_io import GGUFFile, GGUFWeight  # noqa: E402
from diffcore.loader.safetensors_io import load_into_module, skip_init  # noqa: E402
from diffcore.testing.gguf import assert_gguf_parity, check_gguf_parity, write_gguf  # noqa: E402
from diffcore.testing.key_layouts import assert_converts_like, tagged  # noqa: E402
from diffcore.testing.weights import perturb_  # noqa: E402
from diffcore_wan.key_layouts import LAYOUTS  # noqa: E402
from diffcore_wan.transformer import WanTransformer3DModel  # noqa: E402

ORACLE_GGUF = (load_gguf_checkpoint, dequantize_gguf_tensor)  # diffusers' own GGUF reader and dequantizer

CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4, text_dim=256,
           freq_dim=256, ffn_dim=512, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
           rope_max_seq_len=1024)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 4, 3, 6, 10, generator=g), timestep=torch.tensor([731.0, 96.5]),
                encoder_hidden_states=torch.randn(2, 7, 256, generator=g))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_K", "Q4_K"])
def test_gguf_transformer_matches_diffusers_on_the_same_file(qtype, tmp_path):
    r = check_gguf_parity(WanTransformer3DModel, diffusers.WanTransformer3DModel, CFG, _inputs(), tmp_path, qtype, ORACLE_GGUF)
    print(f"wan {qtype}: {r}")
    assert_gguf_parity(r, min_quantized=10)


# ---- the original Wan-Video layout ----

I2V = dict(image_dim=256, added_kv_proj_dim=256)


def original_keys(layers: int, i2v: bool) -> list[str]:
    """The parameter names of Wan-Video's ``WanModel`` (wan/modules/model.py), T2V or I2V."""
    keys = ["patch_embedding.weight", "patch_embedding.bias", "head.modulation"]
    stems = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"]
    stems += ["img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4"] if i2v else []
    for i in range(layers):
        b = f"blocks.{i}."
        keys += [b + "modulation"]
        stems += [b + "norm3", b + "ffn.0", b + "ffn.2"]
        stems += [f"{b}{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"]
        stems += [f"{b}cross_attn.k_img", f"{b}cross_attn.v_img"] if i2v else []
        keys += [f"{b}{a}.{n}.weight" for a in ("self_attn", "cross_attn") for n in ("norm_q", "norm_k")]
        keys += [f"{b}cross_attn.norm_k_img.weight"] if i2v else []
    return keys + [f"{s}.{w}" for s in stems for w in ("weight", "bias")]


def diffusers_names(keys: list[str]) -> dict[str, str]:
    """{original key: diffusers name}, as diffusers' converter renames them (each key tagged by its index)."""
    tagged = convert_wan_transformer_to_diffusers({k: torch.tensor([float(n)]) for n, k in enumerate(keys)})
    return {keys[int(v)]: name for name, v in tagged.items()}


@pytest.mark.parametrize("i2v", [False, True])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_mapping_equals_diffusers_converter(i2v, prefix):
    """Wan 2.1 14B widths (5120, ffn 13824), rows tagged by index: every tensor lands where diffusers puts it."""
    dim, shapes = 5120, {}
    for k in original_keys(2, i2v):
        rows = 13824 if ".ffn.0." in k else 6 * dim if k.startswith("time_projection") else dim
        shapes[prefix + k] = (1, 6, dim) if k.endswith("modulation") else (rows, 1) if k.endswith("weight") else (rows,)
    sd = tagged(shapes)
    ref = convert_wan_transformer_to_diffusers(dict(sd))
    assert_converts_like(sd, ref, LAYOUTS, LAYOUTS[1])
    with skip_init():
        model = WanTransformer3DModel.from_config({**CFG, "num_layers": 2, **(I2V if i2v else {})}, device="meta")
    assert {k for k in ref if WanTransformer3DModel.map_state_dict_key(k)} == set(model.state_dict())


def test_flf2v_position_embedding_lands_on_the_model():
    """Wan 2.1 FLF2V's ``img_emb.emb_pos`` (which diffusers' converter leaves unmapped) -> ``image_embedder.pos_embed``."""
    config = {**CFG, **I2V, "pos_embed_seq_len": 514}
    with skip_init():
        model = WanTransformer3DModel.from_config(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = diffusers_names(original_keys(1, True))
    shapes = {orig: expected[name] for orig, name in names.items()} | {"img_emb.emb_pos": (1, 514, 256)}
    sd = tagged(shapes)
    view = key_layouts.view(list(sd), lambda k: tuple(sd[k].shape), sd.__getitem__, LAYOUTS)
    assert {k: view.shape(k) for k in view.keys} == expected
    assert torch.equal(view.tensor("condition_embedder.image_embedder.pos_embed"), sd["img_emb.emb_pos"])


def _tiny(i2v: bool, folder):
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**CFG, **(I2V if i2v else {})).eval()
    perturb_(ref, 0)
    ref.save_config(folder / "transformer")
    state = ref.state_dict()
    names = diffusers_names(original_keys(CFG["num_layers"], i2v))
    assert set(names.values()) == set(state)  # the original key list is complete
    return ref, {orig: state[name] for orig, name in names.items()}


def _inputs_for(i2v: bool):
    if not i2v:
        return _inputs()
    g = torch.Generator().manual_seed(1)  # diffusers splits image/text context at a hard-coded 512 text tokens
    return {**_inputs(), "encoder_hidden_states": torch.randn(2, 512, 256, generator=g),
            "encoder_hidden_states_image": torch.randn(2, 5, 256, generator=g)}


def _ours(path, config):
    with skip_init():
        model = WanTransformer3DModel.from_config(dict(config), device="meta")
    return load_into_module(model, [path], key_map=model.map_state_dict_key, dtype=torch.float32).eval()


@pytest.mark.parametrize("qtype,i2v", [("Q8_0", False), ("Q4_K", True), ("Q5_K", False)])
def test_original_layout_gguf_matches_diffusers_on_the_same_file(qtype, i2v, tmp_path):
    ref, original = _tiny(i2v, tmp_path)
    written = write_gguf(original, tmp_path / "wan-orig.gguf", qtype)
    config = {**CFG, **(I2V if i2v else {})}
    ours = _ours(tmp_path / "wan-orig.gguf", config)
    theirs = diffusers.WanTransformer3DModel.from_single_file(
        str(tmp_path / "wan-orig.gguf"), config=str(tmp_path), subfolder="transformer", local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()
    packed = sum(isinstance(p, GGUFWeight) for p in ours.parameters())
    assert packed == sum(v == qtype for v in written.values()) >= 10  # renamed, still packed
    with torch.no_grad():
        got, want = ours(**_inputs_for(i2v)), theirs(**_inputs_for(i2v), return_dict=False)[0]
        full = ref(**_inputs_for(i2v), return_dict=False)[0]

    def err(a, b):
        return float((a - b).abs().max() / b.abs().max())

    print(f"wan original-layout {qtype} i2v={i2v}: vs diffusers {err(got, want):.2e}, vs unquantized {err(got, full):.2e}")
    assert err(got, want) < 5e-3  # diffusers dequantizes with fp16 scales (see gguf_io)
    assert 1e-4 < err(got, full) < 0.2


def test_pipeline_takes_original_layout_files(wan_folders, tmp_path):
    """The official release's layout as .safetensors (plain tensors: the same output bit for bit) and as a
    city96-style Q8_0 GGUF under ComfyUI's ``model.diffusion_model.`` prefix, reshaped tensors included (close, packed)."""
    from safetensors.torch import load_file, save_file

    from diffcore import DiffGenerator

    folder = wan_folders["t2v21"]
    state = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    names = diffusers_names(original_keys(2, False))
    assert set(names.values()) == set(state)
    original = {orig: state[name].contiguous() for orig, name in names.items()}
    save_file(original, tmp_path / "wan2.1_t2v_tiny.safetensors")
    write_gguf({f"model.diffusion_model.{k}": v for k, v in original.items()}, tmp_path / "wan2.1-t2v-tiny-Q8_0.gguf", "Q8_0",
               shape_fix=True)  # the 5-D patch embedding as (numel / 256, 256) rows, as city96's Wan files hold it
    kw = dict(prompt="a red circle", num_frames=5, height=32, width=48, num_inference_steps=2, seed=0, output_type="np")
    base = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False).generate(**kw).output
    same = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, gguf=tmp_path / "wan2.1_t2v_tiny.safetensors")
    assert (same.generate(**kw).output == base).all()
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, gguf=tmp_path / "wan2.1-t2v-tiny-Q8_0.gguf")
    transformer = gen.components["transformer"]
    assert sum(isinstance(p, GGUFWeight) for p in transformer.parameters()) > 10
    patch = transformer.patch_embedding.weight
    assert isinstance(patch, GGUFWeight) and patch.logical_shape == tuple(state["patch_embedding.weight"].shape)
    mse = float(((gen.generate(**kw).output - base) ** 2).mean())
    assert 0 < mse < 1e-3, mse


def test_a_flux_file_is_refused_naming_flux(wan_folders, tmp_path):
    pytest.importorskip("diffcore_flux")
    from diffcore import DiffGenerator

    bfl = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32), "single_blocks.0.linear1.weight": torch.zeros(224, 32),
           "img_in.weight": torch.zeros(32, 64)}
    write_gguf(bfl, tmp_path / "flux1-dev-Q8_0.gguf", "Q8_0")
    assert GGUFFile(tmp_path / "flux1-dev-Q8_0.gguf").keys == list(bfl)
    with pytest.raises(LoaderError) as e:
        DiffGenerator.from_pretrained(wan_folders["t2v21"], dtype="float32", progress=False, gguf=tmp_path / "flux1-dev-Q8_0.gguf")
    msg = str(e.value)
    assert "FLUX original (BFL)" in msg and "FluxTransformer2DModel" in msg and "not of WanTransformer3DModel" in msg, msg
    assert "double_blocks.0.img_attn.qkv.weight" in msg, msg  # and the keys that do not fit
    assert any(k.startswith("double_blocks.0.img_attn.qkv.weight") for k in e.value.unexpected)  # as attributes too
