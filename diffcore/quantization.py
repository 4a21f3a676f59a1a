"""Weight quantization of the denoising transformer(s) with torchao (``pip install 'diffcore[quant]'``).

``EngineArgs(quantization=...)`` / ``--quantization``:

| scheme | weights | activations | where |
|---|---|---|---|
| ``int8_weight_only`` | int8, per channel | compute dtype | everywhere |
| ``int8_dynamic`` | int8, per channel | int8, per token, at run time | everywhere (slow on CPUs without VNNI) |
| ``fp8_weight_only`` | float8 e4m3, per channel | compute dtype | CPU; CUDA compute capability >= 8.9 |
| ``fp8`` | float8 e4m3, per row | float8, per row, at run time | CUDA compute capability >= 8.9 |

Why weight-only on the CPU: it halves (int8/fp8 vs bf16) or quarters (vs fp32) the transformer's
memory with ~0.6% relative error per layer, but it is no faster there (the GEMM dequantizes); on a
GPU fp8 with dynamic activations uses the fp8 tensor cores.

Quantization streams with loading (``LayerQuantizer``): each ``nn.Linear`` is quantized as soon
as its weights are in place (torchao's ``quantize_`` swaps the weight for its quantized tensor), so
only one layer's full-precision weight exists at a time, and the file pages or converted copy
behind it are handed back right away. torchao's freed temporaries are returned to the system
(``diffcore.memory.trim``, ``malloc_trim``) after every quantized layer, before the next layer's
are allocated. Trimming less often saves little (a trim's cost is mostly the pages it hands back,
not the call: all 62 trims of a FLUX-medium int8 load took 0.02-0.04 s of 0.8-1.5 s) and the load's
peak grows by the untrimmed temporaries (``benchmarks/quant_trim.py``); the time of a quantized load
is torchao's. Quantized layers take the plain ``F.linear`` path in ``diffcore.models.linear`` (the
oneDNN path and weight pre-packing only serve plain tensors).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError
from .memory import release_pages, trim

log = logging.getLogger(__name__)

SCHEMES = ("int8_weight_only", "int8_dynamic", "fp8_weight_only", "fp8")
ALIASES = {"int8": "int8_weight_only", "int8wo": "int8_weight_only", "fp8wo": "fp8_weight_only",
           "int8dq": "int8_dynamic", "fp8dq": "fp8"}
MIN_LINEAR_FEATURES = 16  # tiny projections (e.g. a 3-channel patch embed) gain nothing and some kernels refuse them
TRIM_BYTES = 0  # weight bytes quantized between two trims; 0: after every layer (see the module docstring)


def parse_scheme(value: Optional[str]) -> Optional[str]:
    """Canonical scheme name (aliases accepted); ``None`` means no quantization."""
    if value is None:
        return None
    name = ALIASES.get(str(value).lower(), str(value).lower())
    if name not in SCHEMES:
        raise ConfigError(f"unknown quantization {value!r}; accepted: {', '.join(SCHEMES)} "
                          f"(aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())})")
    return name


def _fp8_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def check_supported(scheme: str, device: torch.device | str) -> None:
    """Refuse a scheme the device cannot run, before any weights are loaded."""
    device = torch.device(device)
    if scheme == "fp8" and not _fp8_capable(device):
        raise ConfigError(f"quantization 'fp8' (fp8 weights and activations) needs a CUDA GPU with compute capability "
                          f">= 8.9 (Ada, Hopper or newer); device {device} has none. Use 'fp8_weight_only' or "
                          "'int8_weight_only' here")
    if scheme == "fp8_weight_only" and device.type == "cuda" and not _fp8_capable(device):
        raise ConfigError(f"quantization 'fp8_weight_only' needs compute capability >= 8.9 on CUDA ({device}); "
                          "use 'int8_weight_only'")
    _torchao()


def _torchao():
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise ConfigError("quantization needs torchao: pip install 'diffcore[quant]'") from e
    return tq


def _config(scheme: str):
    tq = _torchao()
    if scheme == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if scheme == "fp8_weight_only":
        return tq.Float8WeightOnlyConfig()
    return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())


def _eligible(module: nn.Module, fqn: str) -> bool:
    if not isinstance(module, nn.Linear) or type(module.weight) not in (torch.Tensor, nn.Parameter):
        return False  # already quantized (e.g. GGUF weights)
    return min(module.in_features, module.out_features) >= MIN_LINEAR_FEATURES and module.weight.is_floating_point()


def _quantize_layer(tq, layer: nn.Module, config) -> int:
    """Quantize one eligible ``nn.Linear`` in place; its full-precision weight is dropped (and its pages
    handed back when it was a view of the memory-mapped checkpoint). Returns the dropped weight's
    bytes (0: left as it was)."""
    if hasattr(layer, "unpack"):
        layer.unpack()  # a oneDNN-packed weight back to the plain layout
    old = layer.weight
    tq.quantize_(layer, config, filter_fn=_eligible)
    if layer.weight is old:
        return 0
    release_pages(old.data)
    return old.numel() * old.element_size()


class LayerQuantizer:
    """The loader's ``on_module`` hook (``diffcore.loader.load_component``): quantizes each eligible
    linear layer as soon as its weights are in place, so the full-precision copy of only one layer
    exists at a time, even when loading converts the checkpoint's dtype (an fp32 file loaded as bf16,
    or bf16 upcast to fp32 on CPUs without native bf16).

    The allocator's free memory is handed back once ``trim_bytes`` of full-precision weights have
    been quantized since the last trim (by default after every layer), and by ``finish()``, which
    the caller runs when the load is done.
    """

    def __init__(self, scheme: str, trim_bytes: int = TRIM_BYTES):
        self.scheme = parse_scheme(scheme)
        self.config = _config(self.scheme)
        self.tq = _torchao()
        self.trim_bytes = trim_bytes
        self.count = 0
        self.trims = 0
        self._untrimmed = 0  # weight bytes quantized since the last trim

    def __call__(self, module: nn.Module) -> None:
        dropped = _quantize_layer(self.tq, module, self.config) if _eligible(module, "") else 0
        if dropped:
            self.count += 1
            self._untrimmed += dropped
            if self._untrimmed >= self.trim_bytes:
                self.finish()

    def finish(self) -> None:
        """Hand torchao's freed temporaries back to the system, if any layer was quantized since the last trim."""
        if self._untrimmed:
            trim()
            self.trims += 1
            self._untrimmed = 0


def quantize_model(model: nn.Module, scheme: str) -> int:
    """Quantize ``model``'s linear weights in place, one layer at a time; returns how many were quantized.

    For a model loaded without the streaming hook (``LayerQuantizer``), e.g. by a custom loader;
    layers already quantized are left alone. Each full-precision weight is dropped as soon as its
    quantized copy exists, and the allocator's free memory is handed back at the end.
    """
    tq = _torchao()
    config = _config(parse_scheme(scheme))
    count = sum(_quantize_layer(tq, m, config) > 0 for name, m in model.named_modules() if _eligible(m, name))
    if count:
        trim()
    return count
