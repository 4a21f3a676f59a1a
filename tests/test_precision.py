"""dtype=None on a CPU without native bf16 computes in float32; with AVX512-BF16 / AMX (or on CUDA) bf16 stays.

Both decisions are tested on any machine by making fastpaths report the CPU's features.
"""
from __future__ import annotations

import logging

import pytest
import torch

from diffcore import fastpaths, precision

AVX2 = {"capability": "AVX2", "avx512_bf16": False, "amx_tile": False, "mkldnn": True, "mkldnn_bf16": False}


class Config:
    def dtype_for(self, name, override=None):
        return override or {"vae": torch.float32}.get(name, torch.bfloat16)


@pytest.fixture
def avx2(monkeypatch):
    monkeypatch.setattr(fastpaths, "cpu_features", lambda: dict(AVX2))


@pytest.mark.parametrize("features", [{"avx512_bf16": True}, {"amx_tile": True}])
def test_native_bf16_cpus_keep_the_model_precision(monkeypatch, features):
    monkeypatch.setattr(fastpaths, "cpu_features", lambda: {**AVX2, "capability": "AVX512", **features})
    dtypes, why = precision.resolve(Config(), ["transformer", "vae"], None, "cpu")
    assert dtypes == {"transformer": torch.bfloat16, "vae": torch.float32} and why is None


def test_cpu_without_native_bf16_computes_in_float32(avx2, caplog):
    dtypes, why = precision.resolve(Config(), ["transformer", "vae"], None, "cpu")
    assert dtypes == {"transformer": torch.float32, "vae": torch.float32}
    assert "AVX2" in why
    with caplog.at_level(logging.WARNING, logger="diffcore.precision"):
        precision.explain({"transformer": torch.nn.Linear(1, 1), "tokenizer": object()}, why)
    assert len(caplog.records) == 1 and "transformer in float32" in caplog.text and "tokenizer" not in caplog.text
    # an explicit dtype is always honoured
    assert precision.resolve(Config(), ["transformer"], torch.bfloat16, "cpu") == ({"transformer": torch.bfloat16}, None)


def test_this_machine_is_reported_as_it_is():
    fast, why = precision.native_bf16("cpu")
    f = fastpaths.cpu_features()
    assert fast == bool(f["avx512_bf16"] or f["amx_tile"]) and why


def _dtypes(gen) -> dict:
    return {n: c.dtype for n, c in gen.components.items() if isinstance(c, torch.nn.Module)}


def test_pipeline_loads_float32_on_an_avx2_cpu(monkeypatch, toy_folder, toy_manager, caplog):
    from diffcore import DiffGenerator

    load = lambda **kw: DiffGenerator.from_pretrained(toy_folder, progress=False, plugin_manager=toy_manager, **kw)  # noqa: E731
    monkeypatch.setattr(fastpaths, "cpu_features", lambda: {**AVX2, "capability": "AVX512", "avx512_bf16": True})
    native = _dtypes(load())
    assert native["transformer"] == torch.bfloat16 and native["vae"] == torch.float32  # as the model asks
    monkeypatch.setattr(fastpaths, "cpu_features", lambda: dict(AVX2))
    with caplog.at_level(logging.WARNING, logger="diffcore.precision"):
        gen = load()
    assert set(_dtypes(gen).values()) == {torch.float32}
    assert caplog.text.count("instead of the model's bfloat16") == 1 and "transformer" in caplog.text
    assert "vae" not in caplog.text  # it asked for float32 already
    assert _dtypes(load(dtype="bfloat16"))["transformer"] == torch.bfloat16  # an explicit dtype wins
