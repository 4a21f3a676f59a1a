"""Tests of diffcore.testing's offline tiny tokenizers, encoders, image processors and weight helpers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

from diffcore.testing.text_encoders import (
    tiny_clip_image_processor,
    tiny_clip_text_model,
    tiny_clip_vision_model,
    tiny_qwen25vl,
    tiny_qwen2vl_image_processor,
    tiny_t5_encoder,
    tiny_umt5_encoder,
)
from diffcore.testing.tokenizers import (
    DEFAULT_WORDS,
    QWEN2_SPECIAL_TOKENS,
    tiny_clip_tokenizer,
    tiny_qwen2_tokenizer,
    tiny_t5_tokenizer,
)
from diffcore.testing.weights import cosine, max_abs_diff, perturb_, psnr
from diffcore_qwen.processor import expand_image_tokens  # the one implementation: the Qwen plugin's own
from diffcore_qwen.testing import tiny_qwen_image_tokenizer  # knows the Qwen-Image templates


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


PROMPTS = [
    "a cat",
    "A red circle on a blue background.",
    "Photo of 3 dogs, high quality!",
    "zebra élan naïve 东京 🐱 <b>x</b>",  # unknown words, non-ASCII, emoji
    "",
]

TOKENIZERS = {"clip": (tiny_clip_tokenizer, CLIPTokenizer), "t5": (tiny_t5_tokenizer, T5Tokenizer),
              "qwen2": (tiny_qwen2_tokenizer, Qwen2Tokenizer)}


def _image(seed=0, size=(48, 40)):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ weights
def _toy():
    torch.manual_seed(123)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    torch.nn.init.zeros_(m[2].weight)  # zero-init output layer, like adaLN gates
    return m


def test_perturb_is_deterministic_and_moves_trivial_params():
    a, b, c, ref = _toy(), _toy(), _toy(), _toy()
    rng_before = torch.get_rng_state()
    perturb_(a, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before), "perturb_ must not touch the global RNG"
    perturb_(b, seed=7)
    perturb_(c, seed=8)
    for (n, pa), pb, pc, p0 in zip(a.named_parameters(), b.parameters(), c.parameters(), ref.parameters()):
        assert torch.equal(pa, pb), n
        assert not torch.equal(pa, pc), n
        assert not torch.equal(pa, p0), n
    # zero weight and biases: + N(0, 0.05); norm scale: 1 + N(0, 0.2); plain weights: + N(0, 0.02)
    assert 0.03 < (a[2].weight - ref[2].weight).std() < 0.07
    assert 0.03 < (a[0].bias - ref[0].bias).std() < 0.07
    assert (a[1].bias != 0).all()
    assert 0.1 < (a[1].weight - 1).std() < 0.3
    assert 0.012 < (a[0].weight - ref[0].weight).std() < 0.03
    # dtype independent: same noise in bf16 (up to rounding)
    d = _toy().to(torch.bfloat16)
    perturb_(d, seed=7)
    assert max_abs_diff(d[1].weight.float(), a[1].weight) < 1e-2


def test_metrics():
    x = torch.linspace(0, 1, 100)
    y = x + 0.01
    assert psnr(x, x) == float("inf")
    assert psnr(x, y) == pytest.approx(40.0, abs=1e-4)
    assert psnr(x.numpy() * 255, y.numpy() * 255, data_range=255) == pytest.approx(40.0, abs=1e-3)
    assert max_abs_diff(x, y.numpy()) == pytest.approx(0.01, abs=1e-7)
    assert cosine(x, 2 * x) == pytest.approx(1.0, abs=1e-12)
    assert cosine([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.0)
    assert cosine([1.0, 1.0], [-1.0, -1.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        max_abs_diff(x, x[:3])


# ---------------------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_deterministic_and_round_trip(name, tmp_path):
    build, cls = TOKENIZERS[name]
    a, b = build(), build()
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    for reloaded in (cls.from_pretrained(tmp_path / "a"), AutoTokenizer.from_pretrained(tmp_path / "a")):
        assert type(reloaded) is cls
        assert len(reloaded) == len(a)
        assert reloaded.all_special_ids == a.all_special_ids
        assert (reloaded.eos_token_id, reloaded.pad_token_id) == (a.eos_token_id, a.pad_token_id)
        for p in PROMPTS:
            assert reloaded(p)["input_ids"] == a(p)["input_ids"], p
        assert reloaded(PROMPTS, padding="max_length", max_length=20, truncation=True)["input_ids"] == a(
            PROMPTS, padding="max_length", max_length=20, truncation=True)["input_ids"]


_FINGERPRINT = """
import hashlib, json, sys, tempfile, os
from diffcore.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer, tiny_qwen2_tokenizer
from diffcore.testing.text_encoders import tiny_clip_text_model
out = {}
for name, build in (("clip", tiny_clip_tokenizer), ("t5", tiny_t5_tokenizer), ("qwen2", tiny_qwen2_tokenizer)):
    d = tempfile.mkdtemp()
    build().save_pretrained(d)
    out[name] = hashlib.sha256(open(os.path.join(d, "tokenizer.json"), "rb").read()).hexdigest()
sd = tiny_clip_text_model(tiny_clip_tokenizer()).state_dict()
out["clip_text"] = hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()
print(json.dumps(out))
"""


def test_builds_identical_across_processes_and_hash_seeds():
    """The tokenizers trainers are hash-order dependent; our constructed vocabularies must not be.
    Compares this process (random hash seed unless PYTHONHASHSEED is set) with a fresh one."""
    import contextlib
    import io
    import subprocess
    import sys

    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = dict(os.environ, PYTHONHASHSEED=seed, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", _FINGERPRINT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(_FINGERPRINT, {})
    assert json.loads(res.stdout.strip().splitlines()[-1]) == json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("name", TOKENIZERS)
def test_known_words_are_single_tokens_unknown_text_falls_back(name):
    tok = TOKENIZERS[name][0]()
    special = set(tok.all_special_ids)
    for w in DEFAULT_WORDS + tuple("0123456789,.!?"):
        for text in (w, "x " + w):
            ids = [i for i in tok(text)["input_ids"] if i not in special]
            # Qwen2's pre-tokenizer splits digits singly, so " 7" is "Ġ" + "7" (as with the real vocab)
            expected = 1 if text == w else 3 if (name == "qwen2" and w.isdigit()) else 2
            assert len(ids) == expected, (text, tok.convert_ids_to_tokens(ids))
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        assert len([i for i in ids if i not in special]) >= len(p.split())
    unk = tok.unk_token_id
    if name == "qwen2":  # byte-level: lossless, never <unk>
        assert unk is None
        for p in PROMPTS:
            assert tok.decode(tok(p)["input_ids"]) == p
    elif name == "clip":  # byte-level too (lower-cased); <unk> never produced
        assert unk not in tok("zebra élan 东京 🐱")["input_ids"][1:-1]
        assert tok.decode(tok("Zebra élan")["input_ids"], skip_special_tokens=True) == "zebra élan"
    else:  # T5: unknown ASCII words split into characters, non-ASCII chars become <unk>
        assert tok.convert_ids_to_tokens(tok("zebra")["input_ids"]) == ["▁z", "e", "b", "r", "a", "</s>"]
        assert unk in tok("东京")["input_ids"]


def test_clip_tokenizer_layout():
    tok = tiny_clip_tokenizer()
    assert tok.model_max_length == 77
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    ids = tok("A Cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "cat</w>"]
    assert tiny_clip_tokenizer(words=["zebra"])("zebra")["input_ids"][1:-1] != tok("zebra")["input_ids"][1:-1]


def test_t5_tokenizer_layout():
    tok = tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(tok("a cat")["input_ids"]) == ["▁a", "▁cat", "</s>"]


def test_qwen2_special_tokens():
    tok = tiny_qwen2_tokenizer()
    ids = tok.convert_tokens_to_ids(list(QWEN2_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(QWEN2_SPECIAL_TOKENS))) and ids[-1] == len(tok) - 1
    assert set(ids) <= set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    toks = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert toks[:6] == ["<|im_start|>", "user", "Ċ", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]


def _qwen_pipelines():
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    out = {}
    for cls in (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline):
        kwargs = {"scheduler": None, "vae": None, "text_encoder": None, "tokenizer": None, "transformer": None}
        if cls is not QwenImagePipeline:
            kwargs["processor"] = None
        pipe = cls(**kwargs)
        out[cls.__name__] = (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    return out


def test_qwen_template_prefix_counts():
    """The pipelines drop `start_idx` leading hidden states; with our tokenizer those must be exactly the
    system/user prefix, as with the real Qwen tokenizer (34 for Qwen-Image, 64 for Edit / Edit-Plus)."""
    tok = tiny_qwen_image_tokenizer()
    templates = _qwen_pipelines()
    assert {k: v[1] for k, v in templates.items()} == {
        "QwenImagePipeline": 34, "QwenImageEditPipeline": 64, "QwenImageEditPlusPipeline": 64}
    for name, (template, drop) in templates.items():
        prompt = "a red circle on a blue background"
        if name == "QwenImageEditPlusPipeline":
            prompt = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + prompt
        ids = tok([template.format(prompt)], padding=True, return_tensors="pt")["input_ids"][0].tolist()
        prefix = template[: template.index("{}")]
        if name == "QwenImageEditPipeline":
            prefix = prefix[: prefix.index("<|vision_start|>")]
        assert len(tok(prefix)["input_ids"]) == drop, name
        assert tok.decode(ids[:drop]) == prefix, name
        assert tok.decode(ids[drop:]).startswith(template[len(prefix):].format(prompt)[:20]), name


# ------------------------------------------------------------------------------------------- models
MODEL_BUILDERS = {
    "clip_text": lambda: tiny_clip_text_model(tiny_clip_tokenizer()),
    "t5": lambda: tiny_t5_encoder(tiny_t5_tokenizer()),
    "umt5": lambda: tiny_umt5_encoder(tiny_t5_tokenizer()),
    "clip_vision": lambda: tiny_clip_vision_model(),
    "qwen25vl": lambda: tiny_qwen25vl(tiny_qwen2_tokenizer()),
}


@pytest.mark.parametrize("name", MODEL_BUILDERS)
def test_model_deterministic_perturbed_and_round_trip(name, tmp_path):
    rng_before = torch.get_rng_state()
    a, b = MODEL_BUILDERS[name](), MODEL_BUILDERS[name]()
    assert torch.equal(torch.get_rng_state(), rng_before), "builders must not consume the global RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    params = dict(a.named_parameters())
    for k, p in params.items():  # perturbed: no trivial norm scales or zero biases left
        assert not bool((p == 1).all()) and bool(p.any()), k
    a.save_pretrained(tmp_path)
    reloaded = type(a).from_pretrained(tmp_path)
    sr = reloaded.state_dict()
    assert sr.keys() == sa.keys() and all(torch.equal(sr[k], sa[k]) for k in sa)
    assert _config_dict(reloaded.config) == _config_dict(a.config)


def _config_dict(config):
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in ("_name_or_path", "dtype")}

    return clean(config.to_dict())


def test_t5_checkpoint_stores_shared_embedding_only(tmp_path):
    from safetensors import safe_open

    model = tiny_umt5_encoder(tiny_t5_tokenizer())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    assert model.encoder.embed_tokens.weight is model.shared.weight


def test_clip_eos_id_matches_tokenizer_and_pooled_output_is_read_at_eos():
    tok = tiny_clip_tokenizer()
    model = tiny_clip_text_model(tok)
    assert model.config.eos_token_id == tok.eos_token_id != 2  # 2 would select the legacy argmax path
    assert (model.config.bos_token_id, model.config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    assert model.config.max_position_embeddings == 77 and model.config.vocab_size == len(tok)
    batch = tok(["a cat", "a red circle on a blue background"], padding="max_length", max_length=77,
                return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"])
    eos_pos = (batch["input_ids"] == tok.eos_token_id).int().argmax(-1)
    assert eos_pos.tolist() == [3, 8]
    expected = out.last_hidden_state[torch.arange(2), eos_pos]
    assert torch.equal(out.pooler_output, expected)
    assert not torch.allclose(out.pooler_output, out.last_hidden_state[:, -1])


def test_image_processors_save_real_names_and_round_trip(tmp_path):
    img = _image()
    for name, proc in (("clip", tiny_clip_image_processor(32)), ("qwen", tiny_qwen2vl_image_processor())):
        proc.save_pretrained(tmp_path / name)
        cfg = json.loads((tmp_path / name / "preprocessor_config.json").read_text())
        assert cfg["image_processor_type"] == {"clip": "CLIPImageProcessor", "qwen": "Qwen2VLImageProcessor"}[name]
        reloaded = AutoImageProcessor.from_pretrained(tmp_path / name)
        a, b = proc(images=img, return_tensors="pt"), reloaded(images=img, return_tensors="pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    clip = tiny_clip_image_processor(32)(images=img, return_tensors="pt")["pixel_values"]
    assert clip.shape == (1, 3, 32, 32)
    q = tiny_qwen2vl_image_processor()(images=img, return_tensors="pt")
    # 48x40 -> smart_resize to multiples of 28 with >= 56*56 pixels: 84x56 -> 6x4 patches of 14
    assert q["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert q["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    big = tiny_qwen2vl_image_processor()(images=_image(size=(512, 512)), return_tensors="pt")
    assert big["image_grid_thw"].tolist() == [[1, 8, 8]]  # capped by max_pixels = 112*112


def test_clip_vision_model_consumes_image_processor():
    model, proc = tiny_clip_vision_model(image_size=32, patch=8), tiny_clip_image_processor(32)
    with torch.no_grad():
        a = model(**proc(images=_image(0), return_tensors="pt"), output_hidden_states=True).hidden_states[-2]
        b = model(**proc(images=_image(1), return_tensors="pt"), output_hidden_states=True).hidden_states[-2]
    assert a.shape == (1, 1 + 16, 32) and not torch.allclose(a, b)


def test_expand_image_tokens():
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    p = "<|image_pad|>"
    out = expand_image_tokens(["x" + p + "y", "z" + p], grid)
    assert out == ["x" + p * 6 + "y", "z" + p]
    assert expand_image_tokens(p + p, [[1, 2, 4], [1, 4, 4]]) == p * 2 + p * 4
    assert expand_image_tokens(p, [[1, 4, 4]], merge_size=1) == p * 16
    with pytest.raises(ValueError):
        expand_image_tokens("no image", grid[:1])


def test_qwen25vl_forward_with_image(tmp_path):
    tok, proc = tiny_qwen_image_tokenizer(), tiny_qwen2vl_image_processor()
    model = tiny_qwen25vl(tok)
    cfg = model.config
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id) == tuple(
        tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]))
    assert cfg.text_config.vocab_size == len(tok) and cfg.text_config.eos_token_id == tok.eos_token_id
    template, drop = _qwen_pipelines()["QwenImageEditPipeline"]

    def encode(image, prompt="make the circle red", m=model):
        px = proc(images=[image], return_tensors="pt")
        text = expand_image_tokens([template.format(prompt)], px["image_grid_thw"])
        batch = tok(text, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"], output_hidden_states=True)
        return batch["input_ids"][0], out.hidden_states[-1][0]

    ids, h0 = encode(_image(0))
    n_img = int((ids == cfg.image_token_id).sum())
    assert n_img == 4 * 6 // 4
    first = int((ids == cfg.image_token_id).nonzero()[0])
    assert first == drop + 1  # dropped prefix, then <|vision_start|>, then the image tokens
    assert h0.shape == (len(ids), 32) and torch.isfinite(h0).all()
    _, h1 = encode(_image(1))
    assert torch.equal(h0[:first], h1[:first])  # causal: text before the image is unaffected
    assert not torch.allclose(h0[first:], h1[first:])  # the vision tower feeds the image tokens
    _, h2 = encode(_image(0), prompt="make the circle blue")
    assert not torch.allclose(h0[-8:], h2[-8:])
    model.save_pretrained(tmp_path)
    _, h3 = encode(_image(0), m=type(model).from_pretrained(tmp_path))
    assert torch.equal(h0, h3)


# --------------------------------------------------------------------- diffusers uses the helpers
def test_qwenimage_pipeline_encode_prompt_keeps_only_prompt_tokens():
    from diffusers import QwenImagePipeline

    tok = tiny_qwen_image_tokenizer()
    te = tiny_qwen25vl(tok)
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok, transformer=None)
    embeds, mask = pipe.encode_prompt(["a cat", "a red circle on a blue background"], device="cpu")
    # prompt tokens + "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"
    assert mask.sum(-1).tolist() == [2 + 5, 7 + 5]
    ids = tok(pipe.prompt_template_encode.format("a cat"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = te(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(embeds[0, :7], hidden[34:], rtol=0, atol=1e-6)


def test_flux_pipeline_built_from_helpers_round_trips_offline(tmp_path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035)
    perturb_(transformer, seed=1)
    perturb_(vae, seed=2)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
        text_encoder=tiny_clip_text_model(clip_tok), tokenizer=clip_tok,
        text_encoder_2=tiny_t5_encoder(t5_tok), tokenizer_2=t5_tok)

    def run(p, prompt="a red circle on a blue background"):
        return p(prompt, height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images

    ref = run(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"] == ["transformers", "T5Tokenizer"]
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    reloaded = FluxPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(reloaded.tokenizer, CLIPTokenizer) and isinstance(reloaded.tokenizer_2, T5Tokenizer)
    out = run(reloaded)
    assert ref.shape == (1, 32, 32, 3) and np.isfinite(ref).all()
    # Not bitwise: weights loaded from (mmap'd) safetensors have another memory alignment, which moves
    # CPU matmul results by ~1 ulp (cloning the loaded parameters restores bitwise equality).
    assert max_abs_diff(out, ref) < 1e-5
    assert max_abs_diff(run(reloaded, "a cat"), ref) > 1e-3  # the prompt reaches the image
