"""Quantized loading really saves memory: each linear layer is quantized as soon as its weights are
in place (only one full-precision layer exists at a time), and the process RSS shows the saving."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("torchao")

from diffcore.loader import load_into_module  # noqa: E402
from diffcore.models.linear import Linear  # noqa: E402
from diffcore.quantization import LayerQuantizer, quantize_model  # noqa: E402

LAYERS, WIDTH = 24, 1024  # 24 x 1M weights: 96 MB in fp32, 48 MB in bf16, 24 MB in int8


def _model(device="meta", layers=LAYERS, width=WIDTH) -> nn.Sequential:
    with torch.device(device):
        return nn.Sequential(*[Linear(width, width) for _ in range(layers)])


def _full_precision(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and type(m.weight) is nn.Parameter
            and not m.weight.is_meta]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in _model("cpu", layers=4, width=256).state_dict().items()}
    folder = tmp_path_factory.mktemp("quant")
    save_file(state, folder / "fp32.safetensors")
    save_file({k: v.bfloat16() for k, v in state.items()}, folder / "bf16.safetensors")
    return folder


@pytest.mark.parametrize("stored", ["fp32", "bf16"])  # converted at load, or views of the mapped file
def test_layers_are_quantized_while_loading_one_at_a_time(checkpoints, stored):
    model, live = _model(layers=4, width=256), []
    quantizer = LayerQuantizer("int8_weight_only")

    def hook(module):
        live.append(len(_full_precision(model)))  # before this layer is quantized
        quantizer(module)

    load_into_module(model, [checkpoints / f"{stored}.safetensors"], dtype=torch.bfloat16, on_module=hook)
    assert live == [1, 1, 1, 1]  # never more than the layer at hand
    assert quantizer.count == 4 and not _full_precision(model)
    assert quantizer.trims == 4  # by default the temporaries go back after every layer

    # the same quantization as quantizing the loaded model afterwards
    after = load_into_module(_model(layers=4, width=256), [checkpoints / f"{stored}.safetensors"], dtype=torch.bfloat16)
    assert quantize_model(after, "int8_weight_only") == 4
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), after(x))


def test_trims_once_per_trim_bytes_and_once_at_the_end(checkpoints, monkeypatch):
    """With ``trim_bytes`` set, the trim comes once that many weight bytes are quantized; finish() hands back the rest."""
    import diffcore.quantization as q

    trims = []
    quantizer = LayerQuantizer("int8_weight_only", trim_bytes=3 * 256 * 256 * 2)  # three bf16 layers
    monkeypatch.setattr(q, "trim", lambda: trims.append(quantizer.count))
    load_into_module(_model(layers=4, width=256), [checkpoints / "bf16.safetensors"], dtype=torch.bfloat16,
                     on_module=quantizer)
    assert trims == [3]  # after the third layer's bytes, not after each layer
    quantizer.finish()
    assert trims == [3, 4] and quantizer.trims == 2  # the end of the load hands back the rest
    quantizer.finish()
    assert trims == [3, 4]  # nothing quantized since


_PROBE = textwrap.dedent("""
    import json, sys, torch
    from diffcore.loader import load_into_module
    from diffcore.memory import trim
    from diffcore.quantization import LayerQuantizer
    sys.path.insert(0, {tests!r})
    from test_quantization_memory import _model

    def rss():
        d = {{}}
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                d[key] = int(value.split()[0]) * 1024
        return d

    quantizer = LayerQuantizer({scheme!r}) if {scheme!r} else None
    model, x = _model(), torch.randn(8, {width}, dtype=torch.bfloat16)
    warm = _model("cpu", layers=1).bfloat16()  # code and kernels loaded before measuring
    if quantizer is not None:
        quantizer(warm[0])
    with torch.no_grad():
        warm(x)
    del warm
    trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from here (Linux >= 4.0)
    base = rss()
    load_into_module(model, [{path!r}], dtype=torch.bfloat16, on_module=quantizer)
    if quantizer is not None:
        quantizer.finish()  # what from_pretrained does after the load
    trim()  # both sides alike
    loaded = rss()
    with torch.no_grad():
        model(x)
    trim()  # live memory only: not the allocator's cache of freed activations
    used = rss()
    print(json.dumps({{"load": loaded["VmRSS"] - base["VmRSS"], "load_peak": loaded["VmHWM"] - base["VmRSS"],
                      "used": used["VmRSS"] - base["VmRSS"]}}))
""")


def _probes(path, schemes) -> list[dict]:
    """One fresh process per scheme (each its own peak RSS), run side by side: memory is not timing."""
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE.format(tests=str(Path(__file__).parent), scheme=scheme,
                                                                  width=WIDTH, path=str(path))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for scheme in schemes]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_int8_load_holds_about_half_the_memory_of_bf16(tmp_path):
    """An fp32 checkpoint loaded as bf16 (as Wan 2.1's are): unquantized, the bf16 copies stay resident;
    with int8 only the int8 weights do, and the load's peak is not above the unquantized one."""
    torch.manual_seed(0)
    path = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in _model("cpu").state_dict().items()}, path)
    bf16_bytes = LAYERS * WIDTH * WIDTH * 2
    plain, int8 = _probes(path, [None, "int8_weight_only"])
    print({k: round(v / 2**20, 1) for k, v in plain.items()}, {k: round(v / 2**20, 1) for k, v in int8.items()})
    assert plain["load"] > 0.8 * bf16_bytes  # the measurement sees the weights
    assert int8["load"] < plain["load"] - 0.3 * bf16_bytes  # int8 weights: half of bf16
    assert int8["used"] < plain["used"] - 0.3 * bf16_bytes  # and so after running
    assert int8["load_peak"] < plain["load_peak"]  # no full-precision copy on top, only one layer's temporaries
