"""Checkpoint key layouts: row pieces of packed GGUF weights stay packed and equal the dequantized rows; a file is
seen through the layout its markers match (prefix stripped, unknown keys kept); the loader converts and explains."""
from __future__ import annotations

import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")

from diffcore.errors import WeightMismatchError  # noqa: E402
from diffcore.loader import gguf_io, key_layouts  # noqa: E402
from diffcore.loader.gguf_io import GGUFFile, GGUFWeight, take_rows  # noqa: E402
from diffcore.loader.key_layouts import CheckpointLayout, Piece, split_rows, swap_halves  # noqa: E402
from diffcore.loader.safetensors_io import load_into_module  # noqa: E402
from diffcore.models.base import ModelMixin  # noqa: E402
from diffcore.testing.gguf import write_gguf  # noqa: E402

ROWS = [((0, 3),), ((3, 7),), ((4, 8), (0, 4)), ((1, 2), (6, 8), (2, 3))]


def _packed(qtype, shape, path):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    write_gguf({"w": w}, path, qtype)
    t = GGUFFile(path).tensor("w")
    assert isinstance(t, GGUFWeight) and t.qtype == qtype
    return t


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("rows", ROWS)
def test_row_pieces_of_packed_weights_stay_packed(qtype, rows, tmp_path):
    t = _packed(qtype, (8, 512), tmp_path / "w.gguf")
    got = take_rows(t, rows)
    assert isinstance(got, GGUFWeight) and got.qtype == qtype
    full = t.dequantize()
    want = torch.cat([full[a:b] for a, b in rows])
    assert got.logical_shape == tuple(want.shape)
    assert torch.equal(got.dequantize(), want)  # bit for bit: whole blocks moved, nothing requantized
    row_bytes = t.packed().numel() // 8
    assert got.packed().numel() == sum(b - a for a, b in rows) * row_bytes
    if len(rows) == 1:  # one range is a view of the file's bytes, no copy
        assert got.packed().data_ptr() == t.packed().data_ptr() + rows[0][0] * row_bytes


def test_pieces_off_block_boundaries_are_dequantized(tmp_path):
    t = _packed("Q8_0", (4, 64), tmp_path / "w.gguf")
    flat = GGUFWeight(t.packed(), "Q8_0", (256,))  # a quantized 1-D tensor: rows are single elements
    got = take_rows(flat, ((40, 50), (0, 8)))
    assert not isinstance(got, GGUFWeight)
    full = flat.dequantize()
    assert torch.equal(got, torch.cat([full[40:50], full[:8]]))
    assert isinstance(take_rows(flat, ((32, 96),)), GGUFWeight)  # on block boundaries it stays packed


def test_plain_tensors_take_rows_too():
    t = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(take_rows(t, ((4, 6), (0, 2))), torch.tensor([[8.0, 9], [10, 11], [0, 1], [2, 3]]))
    assert take_rows(t, ((2, 4),)).data_ptr() == t[2].data_ptr()
    assert split_rows("k", (2, 3, 1)) == [Piece("k", ((0, 2),)), Piece("k", ((2, 5),)), Piece("k", ((5, 6),))]
    assert swap_halves("k", 6) == Piece("k", ((3, 6), (0, 3)))


def _fused(keys, shape):
    """A toy original layout: ``qkv`` fused, ``out`` named ``o``; anything else left as it is. ``keys`` may be
    one shard's, so ``qkv`` is split only where it is."""
    out = {"out.weight": Piece("attn.o.weight")}
    if "attn.qkv.weight" in keys:
        n = shape("attn.qkv.weight")[0] // 3
        out.update(zip(("q.weight", "k.weight", "v.weight"), split_rows("attn.qkv.weight", (n, n, n))))
    return out


TOY = CheckpointLayout("toy original", (r"attn\.qkv\.weight",), _fused)


class Toy(ModelMixin):
    checkpoint_layouts = (CheckpointLayout("toy Diffusers names", (r"q\.weight",)), TOY)

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(64, 64, bias=False) for _ in range(4))


def test_view_strips_the_denoiser_prefix_and_keeps_unknown_keys():
    sd = {"model.diffusion_model.attn.qkv.weight": torch.zeros(6, 2), "model.diffusion_model.attn.o.weight": torch.ones(2, 2),
          "model.diffusion_model.extra": torch.ones(1), "first_stage_model.w": torch.ones(3)}
    view = key_layouts.view(list(sd), lambda k: tuple(sd[k].shape), sd.__getitem__, (TOY,))
    assert view.layout is TOY
    assert sorted(view.keys) == ["extra", "k.weight", "out.weight", "q.weight", "v.weight"]  # other components left out
    assert view.shape("k.weight") == (2, 2) and torch.equal(view.tensor("extra"), torch.ones(1))
    plain = key_layouts.view(["a", "b"], lambda k: (1,), lambda k: torch.zeros(1), (TOY,))
    assert plain.layout is None and plain.keys == ["a", "b"]


def test_loader_converts_a_packed_original_layout_file(tmp_path):
    ref = Toy()
    fused = {"attn.qkv.weight": torch.cat([ref.q.weight, ref.k.weight, ref.v.weight]), "attn.o.weight": ref.out.weight}
    write_gguf({k: v.detach() for k, v in fused.items()}, tmp_path / "toy.gguf", "Q8_0")
    write_gguf({k: v.detach() for k, v in ref.state_dict().items()}, tmp_path / "toy-diffusers.gguf", "Q8_0")
    with torch.device("meta"):
        model = Toy()
    load_into_module(model, [tmp_path / "toy.gguf"])
    same = GGUFFile(tmp_path / "toy-diffusers.gguf")
    for name, p in model.named_parameters():
        assert isinstance(p, GGUFWeight) and torch.equal(p.packed(), same.tensor(name).packed()), name
    assert gguf_io.dequantize(model.k.weight.packed(), "Q8_0", (64, 64)).shape == (64, 64)


def test_shards_are_read_in_the_layout_of_the_whole_checkpoint(tmp_path):
    """The marker key sits in one shard; the other is converted all the same (per-file detection left it as is)."""
    from safetensors.torch import save_file

    ref = Toy()
    qkv = torch.cat([ref.q.weight, ref.k.weight, ref.v.weight]).detach()
    shards = [tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"]
    save_file({"attn.o.weight": ref.out.weight.detach().contiguous()}, shards[0])  # no marker key here
    save_file({"attn.qkv.weight": qkv}, shards[1])
    with torch.device("meta"):
        model = Toy()
    load_into_module(model, shards)
    for name, want in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], want), name


def test_a_file_matching_no_layout_names_the_layouts_tried(tmp_path):
    write_gguf({"blocks.0.ffn.weight": torch.zeros(64, 64)}, tmp_path / "other.gguf", "Q8_0")
    with torch.device("meta"):
        model = Toy()
    with pytest.raises(WeightMismatchError) as e:
        load_into_module(model, [tmp_path / "other.gguf"])
    msg = str(e.value)
    assert "blocks.0.ffn.weight" in msg and "q.weight" in msg, msg
    assert "match none of the checkpoint layouts Toy reads (toy Diffusers names, toy original)" in msg, msg
    write_gguf({"attn.qkv.weight": torch.zeros(96, 64)}, tmp_path / "short.gguf", "Q8_0")  # right layout, o missing
    with pytest.raises(WeightMismatchError, match=r"Read short.gguf as toy original\..*"):
        load_into_module(model, [tmp_path / "short.gguf"])
