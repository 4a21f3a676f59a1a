"""The Diffusers-format loader: folder resolution, model_index.json, weight files, components, and its errors."""
from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffcore.errors import (
    CorruptCheckpointError,
    LoaderError,
    MissingFileError,
    PickleRefusedError,
    RegistryError,
    WeightMismatchError,
)
from diffcore.loader import (
    ComponentSpec,
    ConfigFileError,
    find_weight_files,
    load_component,
    load_into_module,
    read_model_index,
    resolve_model_path,
)
from diffcore.models.base import ModelMixin


class TinyNet(ModelMixin):
    diffusers_class_name = "TinyNet"

    def __init__(self, in_features: int = 4, hidden: int = 8, out_features: int = 3):
        super().__init__()
        self.proj_in = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, out_features)
        self.register_buffer("ids", torch.arange(hidden))  # persistent integer buffer

    def forward(self, x):
        return self.proj_out(self.norm(self.proj_in(x)))


class TinyNetFp32Norm(TinyNet):
    _keep_in_fp32_modules = ["norm"]


class RenamedNet(TinyNet):
    """Checkpoint uses ``old_in.*`` for ``proj_in.*`` and carries a key the module drops."""

    @classmethod
    def map_state_dict_key(cls, key):
        if key.startswith("extra."):
            return None
        return key.replace("old_in.", "proj_in.")


class TableNet(TinyNet):
    """Owns a non-persistent table that must be recomputed after a meta-device build."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_buffer("table", torch.linspace(0, 1, 5), persistent=False)


class TableNetWithHook(TableNet):
    def _init_buffers(self, device):
        self.table = torch.linspace(0, 1, 5, device=device)


MODULES = {"TinyNet": TinyNet}
CONFIG = {"_class_name": "TinyNet", "_diffusers_version": "0.42.1", "in_features": 4, "hidden": 8, "out_features": 3}


def reference_state(cls=TinyNet, seed=0):
    torch.manual_seed(seed)
    return {k: v.clone().contiguous() for k, v in cls(in_features=4, hidden=8, out_features=3).state_dict().items()}


def write_component(root, name="transformer", state=None, config=CONFIG, weights="diffusion_pytorch_model.safetensors"):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    state = reference_state() if state is None else state
    if weights is not None:
        save_file(state, str(folder / weights))
    return folder, state


SPEC = ComponentSpec("transformer", "diffusers", "TinyNet")


def load(root, spec=SPEC, modules=MODULES, dtype=torch.float32, **kw):
    return load_component(root, spec, module_classes=modules, scheduler_classes={}, dtype=dtype, device="cpu", **kw)


def meta_net(cls=TinyNet):
    return cls.from_config(CONFIG, device="meta")


# ---- successful loads -------------------------------------------------------------------------


def test_load_equals_saved_weights_without_copy(tmp_path):
    folder, state = write_component(tmp_path)
    model = load(tmp_path)
    assert isinstance(model, TinyNet) and not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and not loaded[k].is_meta
        assert torch.equal(loaded[k], v), k
    assert not any(p.requires_grad for p in model.parameters())
    # fp32 file into fp32 on the CPU: every tensor points into the one memory-mapped file, laid out as
    # in the file (fresh copies would be separate allocations)
    raw = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    bases = {loaded[k].data_ptr() - header[k]["data_offsets"][0] for k in state}
    assert len(bases) == 1
    with open("/proc/self/maps") as f:
        assert str(folder / "diffusion_pytorch_model.safetensors") in f.read()
    x = torch.randn(2, 4)
    ref = TinyNet()
    ref.load_state_dict(state)
    assert torch.equal(model(x), ref(x))
    with torch.no_grad():  # the mapping is copy-on-write: editing a parameter never touches the file
        model.proj_in.weight.add_(1.0)
    assert torch.equal(load(tmp_path).proj_in.weight, state["proj_in.weight"])


def test_dtype_conversion_keeps_integer_buffers(tmp_path):
    _, state = write_component(tmp_path)
    model = load(tmp_path, dtype=torch.bfloat16)
    assert model.proj_in.weight.dtype == torch.bfloat16
    assert torch.equal(model.proj_in.weight, state["proj_in.weight"].to(torch.bfloat16))
    assert model.ids.dtype == torch.int64 and torch.equal(model.ids, state["ids"])


def test_keep_in_fp32_modules(tmp_path):
    write_component(tmp_path)
    model = load(tmp_path, modules={"TinyNet": TinyNetFp32Norm}, dtype=torch.float16)
    assert model.norm.weight.dtype == torch.float32 and model.norm.bias.dtype == torch.float32
    assert model.proj_in.weight.dtype == torch.float16 and model.proj_out.bias.dtype == torch.float16


def test_sharded_load(tmp_path):
    folder, state = write_component(tmp_path, weights=None)
    keys = sorted(state)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2 :]
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": first,
              "diffusion_pytorch_model-00002-of-00002.safetensors": second}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(folder / fname))
        weight_map.update({k: fname for k in ks})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert [p.name for p in find_weight_files(folder)] == list(shards)
    model = load(tmp_path)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_key_map_renames_and_drops(tmp_path):
    state = reference_state()
    renamed = {k.replace("proj_in.", "old_in."): v for k, v in state.items()}
    renamed["extra.unused"] = torch.zeros(2)
    write_component(tmp_path, state=renamed)
    model = load(tmp_path, modules={"TinyNet": RenamedNet})
    assert torch.equal(model.proj_in.weight, state["proj_in.weight"])


def test_non_persistent_buffer_hook(tmp_path):
    write_component(tmp_path)
    model = load(tmp_path, modules={"TinyNet": TableNetWithHook})
    assert torch.equal(model.table, torch.linspace(0, 1, 5))
    with pytest.raises(LoaderError, match=r"table.*meta device.*_init_buffers"):
        load(tmp_path, modules={"TinyNet": TableNet})


def test_extra_state_goes_to_set_extra_state(tmp_path):
    class WithState(TinyNet):
        got = None

        def get_extra_state(self):
            return torch.zeros(2)

        def set_extra_state(self, state):
            self.got = state

    write_component(tmp_path, state={**reference_state(), "_extra_state": torch.tensor([4.0, 5.0])})
    model = load(tmp_path, modules={"TinyNet": WithState})
    assert torch.equal(model.got, torch.tensor([4.0, 5.0])) and "_extra_state" not in model._buffers


def test_strict_false_ignores_unexpected_but_not_missing_meta(tmp_path):
    folder, state = write_component(tmp_path, state={**reference_state(), "bogus.weight": torch.zeros(3)})
    files = find_weight_files(folder)
    model = load_into_module(meta_net(), files, strict=False)
    assert torch.equal(model.proj_out.weight, state["proj_out.weight"])
    partial = {k: v for k, v in reference_state().items() if not k.startswith("norm.")}
    save_file(partial, str(files[0]))
    with pytest.raises(WeightMismatchError, match=r"norm\.weight"):
        load_into_module(meta_net(), files, strict=False)


def test_pickle_refused_then_allowed(tmp_path):
    folder, state = write_component(tmp_path, weights=None)
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(PickleRefusedError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "diffusion_pytorch_model.bin" in msg and "allow_pickle=True" in msg and "--allow-pickle" in msg
    model = load(tmp_path, allow_pickle=True)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_scheduler_component(tmp_path):
    class DummyScheduler:
        def __init__(self, shift=1.0):
            self.shift = shift

        @classmethod
        def from_config(cls, config):
            return cls(shift=config["shift"])

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DummyScheduler", "shift": 3.0}))
    spec = ComponentSpec("scheduler", "diffusers", "DummyScheduler")
    sched = load_component(tmp_path, spec, module_classes={}, scheduler_classes={"DummyScheduler": DummyScheduler},
                           dtype=None, device="cpu")
    assert isinstance(sched, DummyScheduler) and sched.shift == 3.0


def test_custom_loader_takes_precedence(tmp_path):
    seen = []

    def custom(path, spec, dtype, device):
        seen.append((path, spec.class_name, dtype, device))
        return "built"

    spec = ComponentSpec("processor", "transformers", "Qwen2VLProcessor")
    assert load(tmp_path, spec=spec, custom_loaders={"Qwen2VLProcessor": custom}) == "built"
    assert load(tmp_path, spec=spec, custom_loaders={"processor": custom}) == "built"
    assert seen[0] == (tmp_path / "processor", "Qwen2VLProcessor", torch.float32, "cpu")


# ---- errors -----------------------------------------------------------------------------------


def test_missing_config_json(tmp_path):
    folder, _ = write_component(tmp_path, config=None)
    with pytest.raises(MissingFileError) as e:
        load(tmp_path)
    assert str(folder / "config.json") in str(e.value)


def test_missing_component_folder(tmp_path):
    with pytest.raises(MissingFileError, match=r"'transformer'.*does not exist"):
        load(tmp_path)


def test_missing_weights(tmp_path):
    folder, _ = write_component(tmp_path, weights=None)
    with pytest.raises(MissingFileError) as e:
        load(tmp_path)
    assert str(folder) in str(e.value) and "diffusion_pytorch_model.safetensors" in str(e.value)


def _write_sharded(folder, state, drop_shard=False, misplace=False):
    keys = sorted(state)
    a, b = "m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors"
    save_file({k: state[k] for k in keys[:3]}, str(folder / a))
    if not drop_shard:
        save_file({k: state[k] for k in keys[3:]}, str(folder / b))
    weight_map = {k: (a if i < 3 else b) for i, k in enumerate(keys)}
    if misplace:
        weight_map[keys[-1]] = a
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index, keys


def test_missing_shard(tmp_path):
    folder, state = write_component(tmp_path, weights=None)
    index, _ = _write_sharded(folder, state, drop_shard=True)
    with pytest.raises(MissingFileError) as e:
        load(tmp_path)
    assert "m-00002-of-00002.safetensors" in str(e.value) and str(index) in str(e.value)


def test_index_points_at_shard_lacking_key(tmp_path):
    folder, state = write_component(tmp_path, weights=None)
    index, keys = _write_sharded(folder, state, misplace=True)
    with pytest.raises(CorruptCheckpointError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert keys[-1] in msg and "m-00001-of-00002.safetensors" in msg and str(index) in msg


def test_truncated_safetensors(tmp_path):
    folder, _ = write_component(tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16])
    with pytest.raises(CorruptCheckpointError) as e:
        load(tmp_path)
    assert str(path) in str(e.value) and "re-download" in str(e.value)


def test_garbage_safetensors(tmp_path):
    folder, _ = write_component(tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"<html>404 not found</html>" * 20)
    with pytest.raises(CorruptCheckpointError) as e:
        load(tmp_path)
    assert str(path) in str(e.value)


def test_missing_keys(tmp_path):
    state = {k: v for k, v in reference_state().items() if not k.startswith("proj_out.")}
    folder, _ = write_component(tmp_path, state=state)
    with pytest.raises(WeightMismatchError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "2 missing keys" in msg and "proj_out.weight" in msg and "proj_out.bias" in msg
    assert str(folder / "diffusion_pytorch_model.safetensors") in msg
    assert set(e.value.missing) == {"proj_out.weight", "proj_out.bias"}


def test_unexpected_keys(tmp_path):
    folder, _ = write_component(tmp_path, state={**reference_state(), "decoder.extra": torch.zeros(2)})
    with pytest.raises(WeightMismatchError) as e:
        load(tmp_path)
    assert "1 unexpected keys" in str(e.value) and "decoder.extra" in str(e.value)
    assert "diffusion_pytorch_model.safetensors" in str(e.value)


def test_wrong_shapes(tmp_path):
    write_component(tmp_path, state={**reference_state(), "proj_in.weight": torch.zeros(8, 5)})
    with pytest.raises(WeightMismatchError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "proj_in.weight" in msg and "[8, 5]" in msg and "[8, 4]" in msg


def test_unknown_class(tmp_path):
    write_component(tmp_path)
    with pytest.raises(RegistryError) as e:
        load(tmp_path, spec=ComponentSpec("transformer", "diffusers", "FluxTransformer2DModel"))
    assert "FluxTransformer2DModel" in str(e.value) and "TinyNet" in str(e.value)


# ---- model_index.json and folder resolution ---------------------------------------------------


def test_model_index_skips_null_components(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.35.0",
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
        "tokenizer": ["transformers", "AutoTokenizer"], "boundary_ratio": 0.875, "expand_timesteps": False,
    }))
    index = read_model_index(tmp_path)
    assert index.class_name == "WanPipeline" and index.diffusers_version == "0.35.0"
    assert set(index.components) == {"transformer", "tokenizer"}
    assert index.components["tokenizer"] == ComponentSpec("tokenizer", "transformers", "AutoTokenizer")
    assert index.extra == {"boundary_ratio": 0.875, "expand_timesteps": False}
    assert index.folder == tmp_path


def test_model_index_invalid_json(tmp_path):
    path = tmp_path / "model_index.json"
    path.write_text('{\n  "_class_name": "FluxPipeline",\n  "vae": ["diffusers" "AutoencoderKL"]\n}')
    with pytest.raises(ConfigFileError) as e:
        read_model_index(tmp_path)
    assert str(path) in str(e.value) and "line 3" in str(e.value)


def test_model_index_missing_class_name(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ConfigFileError, match="_class_name"):
        read_model_index(tmp_path)


def test_resolve_local_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    assert resolve_model_path(str(tmp_path)) == tmp_path.resolve()


def test_resolve_nonexistent_local_path(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(MissingFileError) as e:
        resolve_model_path(str(missing))
    assert str(missing) in str(e.value) and "model_index.json" in str(e.value)


def test_resolve_folder_without_model_index(tmp_path):
    with pytest.raises(MissingFileError) as e:
        resolve_model_path(tmp_path)
    assert str(tmp_path) in str(e.value) and "model_index.json" in str(e.value)


def test_resolve_unknown_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(LoaderError) as e:
        resolve_model_path("diffcore-test/no-such-model", cache_dir=tmp_path / "hf")
    assert time.monotonic() - start < 20
    msg = str(e.value)
    assert "diffcore-test/no-such-model" in msg and "HF_HUB_OFFLINE" in msg and "local Diffusers folder" in msg


# ---- transformers components ------------------------------------------------------------------


def test_transformers_text_encoder_and_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, projection_dim=8)
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    spec = ComponentSpec("text_encoder", "transformers", "CLIPTextModel")
    model = load(tmp_path, spec=spec, dtype=torch.float32)
    assert isinstance(model, transformers.CLIPTextModel) and not model.training
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)
    half = load(tmp_path, spec=spec, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")).save_pretrained(tok_dir)
    tok = load(tmp_path, spec=ComponentSpec("tokenizer", "transformers", "CLIPTokenizer"))
    assert tok("a b").input_ids == [0, 2, 3, 1]


def test_transformers_pickle_only_refused(tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin"):
        load(tmp_path, spec=ComponentSpec("text_encoder", "transformers", "CLIPTextModel"))


def test_transformers_unknown_class(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(RegistryError, match="NoSuchModelClass"):
        load(tmp_path, spec=ComponentSpec("text_encoder", "transformers", "NoSuchModelClass"))


def test_resolve_hub_id_from_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--diffcore-test--tiny"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    assert resolve_model_path("diffcore-test/tiny", cache_dir=tmp_path / "hf") == snapshot
    with pytest.raises(LoaderError, match="revision 'v2'"):
        resolve_model_path("diffcore-test/tiny", revision="v2", cache_dir=tmp_path / "hf")
