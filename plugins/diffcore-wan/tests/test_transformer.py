"""Wan transformer: fp32 parity with diffusers on perturbed tiny weights, and real-config key/shape equality."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffcore.models import attention as attn_mod  # noqa: E402
from diffcore_wan.transformer import WanTransformer3DModel  # noqa: E402

import diffusers  # noqa: E402  (the test oracle)
DiffusersWan = diffusers.WanTransformer3DModel

from diffcore.testing.dtypes import DtypeRecorder  # noqa: E402
from diffcore.testing.weights import perturb_  # noqa: E402


T2V = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
I2V = {**T2V, "in_channels": 8, "image_dim": 20, "added_kv_proj_dim": 32}  # added_kv_proj_dim = hidden (2 x 16)
FLF2V = {**I2V, "pos_embed_seq_len": 2 * 7}

B, F, H, W = 2, 3, 6, 10  # latent: 3 frames, non-square -> 3 x 3 x 5 = 45 tokens
N_TXT_I2V = 512  # diffusers splits image/text context at a hard-coded 512 text tokens


def _pair(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = DiffusersWan(**cfg).eval()
    perturb_(ref, seed)
    ours = WanTransformer3DModel.from_config({**cfg, "patch_size": list(cfg["patch_size"])}).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(cfg: dict, seed: int = 0, n_txt: int = 7, n_img: int | None = None, img_batch: int = B):
    g = torch.Generator().manual_seed(seed)
    inp = dict(
        hidden_states=torch.randn(B, cfg["in_channels"], F, H, W, generator=g),
        timestep=torch.tensor([731.0, 96.5]),
        encoder_hidden_states=torch.randn(B, n_txt, cfg["text_dim"], generator=g),
    )
    if n_img is not None:
        inp["encoder_hidden_states_image"] = torch.randn(img_batch, n_img, cfg["image_dim"], generator=g)
    return inp


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
    return cos, (a - b).abs().max().item()


def _per_token_timestep() -> torch.Tensor:
    """Wan 2.2 TI2V layout: first latent frame clean (t=0), the rest at the sample's t."""
    seq = F * (H // 2) * (W // 2)
    mask = torch.ones(B, seq)
    mask[:, : (H // 2) * (W // 2)] = 0
    return mask * torch.tensor([[731.0], [96.5]])


CASES = {
    "t2v": (T2V, {}),
    "i2v": (I2V, dict(n_txt=N_TXT_I2V, n_img=7)),
    "flf2v-pos-embed": (FLF2V, dict(n_txt=N_TXT_I2V, n_img=7, img_batch=2 * B)),
    "ti2v-per-token-timestep": (T2V, dict(per_token=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(case):
    cfg, opts = CASES[case]
    opts = dict(opts)
    per_token = opts.pop("per_token", False)
    ref, ours = _pair(cfg)
    inp = _inputs(cfg, **opts)
    if per_token:
        inp["timestep"] = _per_token_timestep()
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        got = ours(**inp)
        got_pre = ours(**inp, rotary_emb=ours.rope(F, H, W))
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape == (B, cfg["out_channels"], F, H, W)
    cos, err = _compare(got, expected)
    print(f"wan transformer parity [{case}]: cosine={cos:.9f} max|diff|={err:.3e}")
    assert cos >= 0.99999 and err <= 1e-4
    assert torch.equal(got, got_pre)
    # the output must depend on the conditioning (guards against dead temb / context paths)
    with torch.no_grad():
        other_t = ours(**{**inp, "timestep": inp["timestep"] * 0.5 + 10})
        assert (other_t - got).abs().max() > 1e-3
        if "encoder_hidden_states_image" in inp:
            img = inp["encoder_hidden_states_image"]
            other_img = ours(**{**inp, "encoder_hidden_states_image": img.flip(-1)})  # not undone by LayerNorm
            assert (other_img - got).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["t2v", "i2v"])
def test_parity_with_diffusers_batch_one(case):
    """One sample takes the fused path (the AdaLN scale/shift as the layer_norm's affine)."""
    cfg, opts = CASES[case]
    ref, ours = _pair(cfg)
    inp = {k: v[:1] for k, v in _inputs(cfg, **opts).items()}
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        got = ours(**inp)
    cos, err = _compare(got, expected)
    print(f"wan transformer parity [{case}, batch 1]: cosine={cos:.9f} max|diff|={err:.3e}")
    assert cos >= 0.99999 and err <= 1e-4


def test_bfloat16_runs_and_tracks_fp32(fastpath_mode):
    """bf16 weights + inputs keep bf16 activations and stay close to the fp32 diffusers result, with the
    CPU fast paths and with the portable ones (what an AVX2-only CPU runs)."""
    ref, ours = _pair(I2V)
    inp = _inputs(I2V, n_txt=N_TXT_I2V, n_img=7)
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        ours.bfloat16()
        got = ours(**{k: v if k == "timestep" else v.bfloat16() for k, v in inp.items()})
    assert got.dtype == torch.bfloat16
    cos, err = _compare(got.float(), expected)
    print(f"wan transformer bf16 vs diffusers fp32: cosine={cos:.7f} max|diff|={err:.3e}")
    assert cos >= 0.9999


def test_per_token_timestep_uniform_equals_per_sample():
    """A (B, S) timestep that is constant per sample must give the per-sample result."""
    _, ours = _pair(T2V)
    inp = _inputs(T2V)
    seq = F * (H // 2) * (W // 2)
    with torch.no_grad():
        per_sample = ours(**inp)
        per_token = ours(**{**inp, "timestep": inp["timestep"][:, None].expand(B, seq)})
        shared = ours(**{**inp, "timestep": torch.tensor(96.5)})
        batched = ours(**{**inp, "timestep": torch.tensor([96.5, 96.5])})
    cos, err = _compare(per_token, per_sample)
    assert cos >= 0.99999 and err <= 1e-5
    torch.testing.assert_close(shared, batched, rtol=0, atol=1e-6)


def test_rope_matches_diffusers():
    ref, ours = _pair({**T2V, "num_layers": 0})
    cos, sin = ours.rope(F, H, W)
    ref_cos, ref_sin = ref.rope(torch.zeros(1, 4, F, H, W))
    seq = F * (H // 2) * (W // 2)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (seq, 1, 8)
    torch.testing.assert_close(cos, ref_cos[0, :, :, 0::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0, :, :, 1::2], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        WanTransformer3DModel.from_config({**T2V, "num_layers": 0, "rope_max_seq_len": 2}).rope(F, H, W)


def test_all_attention_goes_through_diffcore_attention():
    _, ours = _pair(I2V)
    inp = _inputs(I2V, n_txt=9, n_img=7)
    calls = []

    def counting(q, k, v, attn_mask=None, scale=None):
        calls.append(k.shape[1])
        return attn_mod._math(q, k, v, attn_mask=attn_mask, scale=scale)

    attn_mod.register_backend("test-counting", counting)
    with attn_mod.use_backend("test-counting"), torch.no_grad():
        ours(**inp)
    seq = F * (H // 2) * (W // 2)
    assert sorted(calls) == sorted([seq, 9, 7] * I2V["num_layers"])


def test_step_path_has_no_float64():
    _, ours = _pair(I2V)
    inp = _inputs(I2V, n_txt=9, n_img=7)
    rope = ours.rope(F, H, W)
    recorder = DtypeRecorder()
    with torch.no_grad(), recorder:
        ours(**inp, rotary_emb=rope)
        ours(**{**inp, "timestep": _per_token_timestep()}, rotary_emb=rope)
    assert torch.float32 in recorder.dtypes and torch.float64 not in recorder.dtypes


_COMMON = dict(
    patch_size=[1, 2, 2], attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
REAL = {
    "Wan2.1-T2V-1.3B": dict(num_attention_heads=12, in_channels=16, out_channels=16, ffn_dim=8960, num_layers=30),
    "Wan2.1-T2V-14B": dict(num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824, num_layers=40),
    "Wan2.1-I2V-14B": dict(num_attention_heads=40, in_channels=36, out_channels=16, ffn_dim=13824, num_layers=40,
                           image_dim=1280, added_kv_proj_dim=5120),
    "Wan2.2-TI2V-5B": dict(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30,
                           pos_embed_seq_len=None),
}
# parameter counts from /work/shared/reference/models.md (computed there from diffusers on meta)
REAL_PARAMS = {"Wan2.1-T2V-1.3B": 1_418_996_800, "Wan2.1-T2V-14B": 14_288_491_584,
               "Wan2.1-I2V-14B": 16_394_878_784, "Wan2.2-TI2V-5B": 4_999_787_712}


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_state_dict_matches_diffusers(name):
    cfg = {**_COMMON, **REAL[name], "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0.dev0"}
    ours = WanTransformer3DModel.from_config(cfg, device="meta")
    with torch.device("meta"):
        ref = DiffusersWan(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    ours_keys = {(k, tuple(v.shape)) for k, v in ours.state_dict().items()}
    ref_keys = {(k, tuple(v.shape)) for k, v in ref.state_dict().items()}
    assert ours_keys == ref_keys
    assert sum(v.numel() for v in ours.state_dict().values()) == REAL_PARAMS[name]
