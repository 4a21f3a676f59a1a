"""diffcore's own loading of transformers text encoders (diffcore/loader/transformers_models.py) gives
exactly what ``from_pretrained`` gives, and hands everything it does not cover to ``from_pretrained``."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from diffcore.loader import ComponentSpec, find_weight_files, load_component, load_into_module
from diffcore.loader.safetensors_io import POPULATE_MIN_BYTES, skip_init
from diffcore.loader.transformers_models import load_fast
from diffcore.testing import text_encoders as te
from diffcore.testing import tokenizers as tk

BUILDERS = {
    "CLIPTextModel": lambda: te.tiny_clip_text_model(tk.tiny_clip_tokenizer()),
    "CLIPVisionModel": lambda: te.tiny_clip_vision_model(),
    "T5EncoderModel": lambda: te.tiny_t5_encoder(tk.tiny_t5_tokenizer()),
    "UMT5EncoderModel": lambda: te.tiny_umt5_encoder(tk.tiny_t5_tokenizer()),
    "Qwen2_5_VLForConditionalGeneration": lambda: te.tiny_qwen25vl(tk.tiny_qwen2_tokenizer()),
    "Qwen3ForCausalLM": lambda: _tiny_qwen3(),
    "Qwen3Model": lambda: _tiny_qwen3().model,  # Z-Image's text encoder: the base model, saved without lm_head
    "Mistral3ForConditionalGeneration": lambda: _tiny_mistral3(),
}


def _tiny_qwen3():
    from diffcore.testing.weights import perturb_

    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    return perturb_(transformers.Qwen3ForCausalLM(cfg), seed=1)


def _tiny_mistral3():
    from diffcore.testing.weights import perturb_

    cfg = transformers.Mistral3Config(
        text_config=transformers.MistralConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=8),
        vision_config=transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, head_dim=8, image_size=32, patch_size=8),
        image_token_index=299, spatial_merge_size=2)
    return perturb_(transformers.Mistral3ForConditionalGeneration(cfg), seed=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny encoder saved with ``save_pretrained`` (transformers' own on-disk layout) as ``<class>/text_encoder``."""
    root = tmp_path_factory.mktemp("encoders")
    for name, build in BUILDERS.items():
        build().save_pretrained(root / name / "text_encoder")
    return root


def _load(root, class_name, dtype, monkeypatch):
    """load_component with from_pretrained disabled: proves the fast path built the model."""
    cls = getattr(transformers, class_name)
    with monkeypatch.context() as m:
        m.setattr(cls, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("from_pretrained was called")))
        return load_component(root, ComponentSpec("text_encoder", "transformers", class_name), module_classes={},
                              scheduler_classes={}, dtype=dtype, device="cpu")


def _tensors(model) -> dict:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def _assert_same(fast, ref):
    a, b = _tensors(fast), _tensors(ref)
    assert a.keys() == b.keys()
    for name, t in b.items():
        assert a[name].dtype == t.dtype and a[name].shape == t.shape, name
        assert torch.equal(a[name], t), name
    tied = {(x, y) for x, y in ref.all_tied_weights_keys.items()}
    assert tied == {(x, y) for x, y in fast.all_tied_weights_keys.items()}
    for target, source in tied:
        assert fast.get_parameter(target) is fast.get_parameter(source)
    assert fast.config.to_dict() == ref.config.to_dict()
    assert getattr(fast, "generation_config", None) == getattr(ref, "generation_config", None)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())


@pytest.mark.parametrize("class_name", list(BUILDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_from_pretrained(saved, class_name, dtype, monkeypatch):
    fast = _load(saved / class_name, class_name, dtype, monkeypatch)
    ref = getattr(transformers, class_name).from_pretrained(saved / class_name / "text_encoder", dtype=dtype)
    assert type(fast) is type(ref)
    _assert_same(fast, ref)
    if class_name.startswith(("T5", "UMT5")) and dtype == torch.float16:  # the keep-in-fp32 rule was applied
        assert fast.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    if dtype == torch.float32 and "Vision" not in class_name:
        ids = torch.tensor([[3, 7, 11, 2]])
        with torch.no_grad():
            out_a = fast(ids, output_hidden_states=True).hidden_states[-1]
            out_b = ref.eval()(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(out_a, out_b)


def _rewrite(folder, rename):
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(path)
    save_file({rename(k): v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def _mistral3_legacy(k: str) -> str:
    """Mistral3's pre-v5 names (FLUX.2 [dev]'s text encoder): the LM under ``language_model.``."""
    for new, old in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")):
        if k.startswith(new):
            return old + k[len(new):]
    return k


def test_legacy_key_layouts(saved, tmp_path, monkeypatch):
    """Older checkpoints: CLIP keys under ``text_model.``; Qwen2.5-VL's pre-v5 layout (``visual.``,
    ``model.layers``) and its current one (``model.visual.``, ``model.language_model.``)."""
    import shutil

    for class_name, rename in [
        ("CLIPTextModel", lambda k: "text_model." + k),
        ("Qwen2_5_VLForConditionalGeneration",
         lambda k: "model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)
         if k.startswith("model.") else k),
        ("Mistral3ForConditionalGeneration", _mistral3_legacy),
    ]:
        folder = tmp_path / class_name
        shutil.copytree(saved / class_name, folder)
        _rewrite(folder, rename)
        ref = getattr(transformers, class_name).from_pretrained(folder / "text_encoder")  # its own renames
        _assert_same(_load(folder, class_name, torch.float32, monkeypatch), ref)


def test_other_checkpoints_go_to_from_pretrained(saved, tmp_path):
    import shutil

    folder = tmp_path / "t5"
    shutil.copytree(saved / "T5EncoderModel", folder)
    cls = transformers.T5EncoderModel
    path = folder / "text_encoder"

    def fast():
        return load_fast(cls, path, find_weight_files(path), torch.float32, "cpu")

    assert fast() is not None
    state = load_file(path / "model.safetensors")
    save_file({**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()}, path / "model.safetensors")
    assert fast() is None  # tied weight saved twice: from_pretrained compares the copies
    save_file({**state, "lm_head.weight": state["shared.weight"].clone()}, path / "model.safetensors")
    assert fast() is None  # a key it does not know: from_pretrained drops it (T5's ignore list) or renames
    loaded = load_component(folder, ComponentSpec("text_encoder", "transformers", "T5EncoderModel"),
                            module_classes={}, scheduler_classes={}, dtype=torch.float32, device="cpu")
    _assert_same(loaded, cls.from_pretrained(path))
    assert load_fast(transformers.BertModel, path, find_weight_files(path), torch.float32, "cpu") is None
    assert load_fast(cls, path, find_weight_files(path), None, "cpu") is None  # dtype="auto" is from_pretrained's


def test_skip_init_skips_meta_init_only():
    before = torch.nn.init.kaiming_uniform_
    with skip_init():
        assert torch.nn.init.kaiming_uniform_ is before  # nothing patched: a per-thread torch-function mode
        m = torch.empty(3, device="meta")
        assert torch.nn.init.ones_(m) is m
        t = torch.zeros(3)
        assert torch.nn.init.ones_(t) is t and torch.equal(t, torch.ones(3))  # real tensors still initialise


def test_large_conversion_matches_to(tmp_path):
    """Conversions above POPULATE_MIN_BYTES get pre-faulted memory of their own; values are those of ``Tensor.to``."""
    n = POPULATE_MIN_BYTES // 2 + 7
    state = {"a.weight": torch.randn(n), "b.weight": torch.randn(3, 5), "c.ids": torch.arange(9)}
    save_file(state, tmp_path / "w.safetensors")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
            self.a.weight = torch.nn.Parameter(torch.empty(n, device="meta"))
            self.b.weight = torch.nn.Parameter(torch.empty(3, 5, device="meta"))
            self.c.register_buffer("ids", torch.empty(9, dtype=torch.long, device="meta"))

    net = load_into_module(Net(), [tmp_path / "w.safetensors"], dtype=torch.bfloat16)
    for name, t in net.state_dict().items():
        want = state[name].to(torch.bfloat16) if state[name].is_floating_point() else state[name]
        assert t.dtype == want.dtype and torch.equal(t, want), name
    storage = net.a.weight.untyped_storage()
    assert storage.nbytes() == n * 2 and storage.data_ptr() != net.b.weight.untyped_storage().data_ptr()
    with torch.no_grad():  # converted tensors are ordinary writable memory
        net.a.weight.add_(1.0)
