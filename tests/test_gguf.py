"""GGUF weights: dequantization equals the gguf package's reference; packed weights act as dense ones."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from diffcore.errors import ConfigError, LoaderError, MissingFileError, WeightMismatchError  # noqa: E402
from diffcore.loader import gguf_io  # noqa: E402
from diffcore.loader.safetensors_io import load_into_module  # noqa: E402
from diffcore.models.linear import Linear  # noqa: E402
from diffcore.testing.gguf import quantize, write_gguf  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "BF16"]
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208], "BF16": []}


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_equals_gguf_reference_on_random_blocks(qtype):
    """Every bit pattern (random bytes, finite fp16 scales) decodes exactly as gguf.quants does."""
    rng = np.random.default_rng(0)
    gtype = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[gtype]
    raw = rng.integers(0, 256, (64, nbytes), dtype=np.uint8)
    for pos in F16_FIELDS[qtype]:
        raw[:, pos:pos + 2] = rng.standard_normal(64).astype(np.float16).view(np.uint8).reshape(64, 2)
    if qtype == "BF16":
        raw = rng.standard_normal((64, 1)).astype(np.float32).view(np.uint32).__rshift__(16).astype(np.uint16).view(np.uint8)
    want = gguf.quants.dequantize(raw, gtype).reshape(-1)
    got = gguf_io.dequantize(torch.from_numpy(raw.copy()), qtype, (want.size,)).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_test_quantizer_approximates_weights(qtype):
    w = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    back = gguf.quants.dequantize(quantize(w, qtype), gguf.GGMLQuantizationType[qtype])
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q4_K": 0.12}[qtype], rel


@pytest.fixture
def small_file(tmp_path):
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(8, 256), "a.bias": torch.randn(8), "b.weight": torch.randn(4, 8)}
    path = tmp_path / "w.gguf"
    written = write_gguf(state, path, "Q4_K")
    assert written == {"a.weight": "Q4_K", "a.bias": "F32", "b.weight": "F32"}
    return path, state


def test_packed_weight_acts_as_its_dequantized_tensor(small_file):
    path, state = small_file
    f = gguf_io.GGUFFile(path)
    assert f.shape("a.weight") == (8, 256) and f.qtype("a.weight") == "Q4_K"
    w = f.tensor("a.weight")
    assert isinstance(w, gguf_io.GGUFWeight) and w.dtype == torch.uint8 and not w.is_floating_point()
    assert w.numel() == 8 * 144  # one Q4_K block (144 bytes) per 256 weights: stays packed
    dense = w.dequantize()
    assert (dense - state["a.weight"]).norm() / state["a.weight"].norm() < 0.12
    x = torch.randn(3, 256, dtype=torch.float64)
    torch.testing.assert_close(torch.nn.functional.linear(x, w), x @ w.dequantize(torch.float64).T)
    layer = Linear(256, 8)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.bias = torch.nn.Parameter(f.tensor("a.bias"), requires_grad=False)
    with torch.inference_mode():  # the oneDNN path must not take a packed weight
        y = layer(x.float())
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), dense, layer.bias))
    moved = layer.to("cpu", torch.bfloat16)  # a dtype cast leaves packed bytes alone
    assert isinstance(moved.weight, gguf_io.GGUFWeight) and moved.weight.dtype == torch.uint8
    clone = copy.deepcopy(layer)
    assert isinstance(clone.weight, gguf_io.GGUFWeight)
    assert torch.equal(clone.weight.dequantize(), dense)


def test_loader_assigns_packed_weights_and_checks_shapes(small_file):
    path, state = small_file
    model = torch.nn.Module()
    with torch.device("meta"):
        model.a, model.b = torch.nn.Linear(256, 8), torch.nn.Linear(8, 4, bias=False)
    load_into_module(model, [path], dtype=torch.float32)
    assert isinstance(model.a.weight, gguf_io.GGUFWeight)
    assert torch.equal(model.b.weight, state["b.weight"])
    with torch.device("meta"):
        wrong = torch.nn.Module()
        wrong.a, wrong.b = torch.nn.Linear(512, 4), torch.nn.Linear(8, 4, bias=False)
    with pytest.raises(WeightMismatchError, match="a.weight: checkpoint \\[8, 256\\] vs module \\[4, 512\\]"):
        load_into_module(wrong, [path])


def test_unsupported_type_and_bad_files_are_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "q2.gguf"), "test")
    raw = np.zeros((4, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K][1]), np.uint8)
    writer.add_tensor("w", raw, raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(LoaderError, match="Q2_K.*supported: Q8_0"):
        gguf_io.GGUFFile(tmp_path / "q2.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(LoaderError, match="cannot be read as GGUF"):
        gguf_io.GGUFFile(tmp_path / "junk.gguf")
    with pytest.raises(MissingFileError):
        gguf_io.GGUFFile(tmp_path / "absent.gguf")


def test_engine_args_gguf_accepts_a_path_or_a_mapping():
    from diffcore.configs.engine_args import EngineArgs

    assert set(EngineArgs(gguf="t.gguf").gguf) == {"transformer"}
    assert set(EngineArgs(gguf={"transformer_2": "b.gguf"}).gguf) == {"transformer_2"}
    with pytest.raises(ConfigError, match="gguf must be a path"):
        EngineArgs(gguf=["a.gguf"])


def test_cli_gguf_flag_names_components():
    from diffcore.cli import _gguf_files, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--output", "o.png", "--gguf", "a.gguf",
                                      "transformer_2=b.gguf", "--quantization", "int8"])
    assert _gguf_files(args.gguf) == {"transformer": "a.gguf", "transformer_2": "b.gguf"}
    assert args.quantization == "int8" and _gguf_files(None) is None


def test_city96_reshaped_tensors_keep_their_shape(tmp_path):
    """A conv weight stored as (numel / 256, 256) rows with ``comfy.gguf.orig_shape`` loads with its real shape,
    still packed, and the convolution sees the same weights as the unreshaped tensor."""
    conv = torch.nn.Conv2d(16, 32, 2, bias=False)
    state = {"weight": conv.weight.detach()}
    write_gguf(state, tmp_path / "fixed.gguf", "Q8_0", shape_fix=True)
    f = gguf_io.GGUFFile(tmp_path / "fixed.gguf")
    assert tuple(int(d) for d in reversed(f.tensors["weight"].shape)) == (8, 256)  # as stored
    assert f.shape("weight") == (32, 16, 2, 2) and f.qtype("weight") == "Q8_0"
    with torch.device("meta"):
        ours = torch.nn.Conv2d(16, 32, 2, bias=False)
    load_into_module(ours, [tmp_path / "fixed.gguf"])
    assert isinstance(ours.weight, gguf_io.GGUFWeight)
    want = gguf.quants.dequantize(f.tensors["weight"].data, gguf.GGMLQuantizationType.Q8_0).reshape(32, 16, 2, 2)
    x = torch.randn(1, 16, 5, 5)
    torch.testing.assert_close(ours(x), torch.nn.functional.conv2d(x, torch.from_numpy(want.copy())), rtol=0, atol=0)
