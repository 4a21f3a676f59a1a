"""Write small GGUF files for tests: a state dict quantized per tensor with the ``gguf`` package.

``gguf.quants`` quantizes the legacy types (Q8_0, Q4_0, ...) but not the K-quants, so Q4_K, Q5_K
and Q6_K blocks are packed here with a plain min/max quantizer (valid blocks in ggml's layout;
not llama.cpp's error-minimising search). Tensors that cannot take the type (1-D, or rows not a
multiple of its block) are written as F32, as llama.cpp's converters fall back too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], 2)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of ggml's get_scale_min_k4: 8 six-bit scales and mins -> 12 bytes per block."""
    s = np.zeros((sc.shape[0], 12), np.uint8)
    s[:, :4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    s[:, 8:] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return s


def _affine_k(x: np.ndarray, levels: int):
    """Per 32-element sub-block ``x ~ d*sc*q - dmin*m`` with 6-bit sc/m; returns d, dmin, sc, m, q."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0)
    scale = (sub.max(-1) - lo) / levels
    d = np.maximum(scale.max(-1), 1e-8) / 63
    dmin = np.maximum((-lo).max(-1), 1e-8) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.round((sub + (dmin[:, None] * m)[..., None]) / step), 0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def _q4_k(x):
    d, dmin, sc, m, q = _affine_k(x, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(x.shape[0], 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, m), qs], axis=1)


def _q5_k(x):
    d, dmin, sc, m, q = _affine_k(x, 31)
    low, high = q & 0xF, q >> 4
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(x.shape[0], 128)
    qh = np.zeros((x.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, m), qh, qs], axis=1)


def _q6_k(x):
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    amax = np.maximum(np.abs(sub).max(-1), 1e-8)
    d = (amax.max(-1) / 31 / 127).astype(np.float16).astype(np.float32)
    scales = np.clip(np.round(amax / 31 / np.maximum(d[:, None], 1e-12)), 1, 127).astype(np.int8)
    step = (d[:, None] * scales)[..., None]
    q = (np.clip(np.round(sub / step), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4), q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], 2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), scales.view(np.uint8), _f16_bytes(d)], axis=1)


_K_QUANTS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """``w`` (rows, cols) float32 -> packed ggml bytes (rows, cols / block * bytes_per_block)."""
    import gguf

    if qtype in _K_QUANTS:
        rows = w.reshape(-1, 256).astype(np.float32)
        return _K_QUANTS[qtype](rows).reshape(w.shape[0], -1)
    return gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType[qtype])


def write_gguf(state: Mapping[str, torch.Tensor], path: Path | str, qtype: str, arch: str = "diffcore-test",
               shape_fix: bool = False) -> dict:
    """Write ``state`` to ``path``, 2-D float tensors quantized as ``qtype`` where their rows allow it.

    ``shape_fix``: as city96's converter does for some families, a tensor of 2+ dims whose last dim is no
    multiple of 256 but whose size is becomes ``(numel / 256, 256)``, its shape kept in
    ``comfy.gguf.orig_shape.<name>``. Returns {name: ggml type name written} so a test can check what it exercised.
    """
    import gguf

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    writer = gguf.GGUFWriter(str(path), arch)
    written = {}
    for name, t in state.items():
        arr = t.detach().float().cpu().numpy()
        if shape_fix and arr.ndim > 1 and arr.shape[-1] % 256 and arr.size % 256 == 0:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in arr.shape])
            arr = arr.reshape(-1, 256)
        if arr.ndim == 2 and arr.shape[1] % block == 0:
            writer.add_tensor(name, quantize(arr, qtype),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
            written[name] = qtype
        else:
            writer.add_tensor(name, arr)
            written[name] = "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def diffusers_reference(model_cls, config: Mapping, path: Path | str, oracle_gguf=None):
    """The diffusers model (the oracle) holding the dequantized weights of a GGUF file.

    Without ``oracle_gguf``: ``gguf.quants.dequantize`` (llama.cpp's reference, fp32 arithmetic). With
    ``oracle_gguf=(load_gguf_checkpoint, dequantize_gguf_tensor)``, diffusers' own GGUF reader and
    dequantizer, passed in by the test (diffcore never imports diffusers, not even here); it multiplies in
    fp16, so it differs from ggml's reference by fp16 rounding.
    """
    import gguf

    if oracle_gguf is not None:
        load_gguf_checkpoint, dequantize_gguf_tensor = oracle_gguf
        state = {k: dequantize_gguf_tensor(v).float() for k, v in load_gguf_checkpoint(str(path)).items()}
    else:
        reader = gguf.GGUFReader(str(path))
        state = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            state[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    model = model_cls(**config).eval()
    model.load_state_dict(state, strict=True)
    return model


def check_gguf_parity(ours_cls, diffusers_cls, config: Mapping, inputs: Mapping, tmp_path: Path, qtype: str,
                      oracle_gguf, call=None) -> dict:
    """Write a perturbed diffusers model to a ``qtype`` GGUF file, load it into ``ours_cls`` through the
    loader, and compare with diffusers holding the same dequantized weights.

    ``oracle_gguf`` is diffusers' ``(load_gguf_checkpoint, dequantize_gguf_tensor)`` (see
    ``diffusers_reference``). ``call(model, inputs)`` runs a model (default ``model(**inputs)``; diffusers models are called
    with ``return_dict=False``). Returns the errors so the caller asserts and prints them.
    """
    from diffcore.loader.safetensors_io import load_into_module, skip_init
    from diffcore.testing.weights import perturb_

    torch.manual_seed(0)
    ref = diffusers_cls(**config).eval()
    perturb_(ref, 0)
    path = Path(tmp_path) / f"transformer-{qtype}.gguf"
    written = write_gguf(ref.state_dict(), path, qtype)
    with skip_init():
        ours = ours_cls.from_config(dict(config), device="meta")
    load_into_module(ours, [path], key_map=ours_cls.map_state_dict_key, dtype=torch.float32)
    ours.eval().requires_grad_(False)
    call = call or (lambda m, kw: m(**kw))
    with torch.no_grad():
        got = call(ours, dict(inputs))
        exact = diffusers_reference(diffusers_cls, config, path)(**inputs, return_dict=False)[0]
        df = diffusers_reference(diffusers_cls, config, path, oracle_gguf)(**inputs, return_dict=False)[0]
        full = ref(**inputs, return_dict=False)[0]

    def err(a, b):
        return float((a - b).abs().max() / b.abs().max())

    from diffcore.loader.gguf_io import GGUFWeight

    packed = sum(isinstance(p, GGUFWeight) for p in ours.parameters())
    return {"quantized": sum(v == qtype for v in written.values()), "packed": packed, "vs_ggml": err(got, exact),
            "vs_diffusers_gguf": err(got, df), "vs_unquantized": err(got, full), "shape_ok": got.shape == exact.shape}


def assert_gguf_parity(result: dict, min_quantized: int) -> None:
    """The bounds every family's GGUF test holds ``check_gguf_parity``'s result to."""
    assert result["shape_ok"] and result["quantized"] >= min_quantized, result
    assert result["packed"] == result["quantized"], result  # every quantized tensor stayed packed
    assert result["vs_ggml"] < 1e-5, result  # the same weights as ggml's reference dequantizer: fp32 parity
    assert result["vs_diffusers_gguf"] < 5e-3, result  # diffusers dequantizes in fp16
    assert 1e-4 < result["vs_unquantized"] < 0.2, result  # the quantization is real and bounded
