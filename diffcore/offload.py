"""Offload for accelerators with too little memory: ``EngineArgs(offload="model" | "layers")``.

* ``"model"`` (:class:`ModelOffload`): every component lives in CPU memory and is moved to the
  device only while it runs; starting one component sends the previous one back. Peak device
  memory: the largest component plus activations.
* ``"layers"`` (:class:`LayerOffload`): the transformer(s) keep only their small parts (embedders,
  final norm) on the device; each block's weights come over just before the block runs and are
  dropped after it, and the next block's copy starts on a side CUDA stream while the current one
  computes (``prefetch`` blocks ahead). Peak device memory: the small parts plus ``1 + prefetch``
  blocks. Text encoders (``text_encoder*``) are streamed the same way, by their largest layer list
  (a 24B Mistral does not fit a 24 or 48 GB GPU whole); the other components are model-offloaded.
* ``"text_layers"``: the text encoders streamed by layer, everything else model-offloaded (a
  quantized transformer that fits, beside a text encoder that does not).

The CPU copy is the one the loader produced (pinned on CUDA, so copies can overlap compute); the
device copy is a fresh tensor each time, so nothing is copied back. Blocks are the entries of the
transformer's top-level ``nn.ModuleList`` children (every family's block lists), so no family needs
a hook. With ``device="cpu"`` (the tests) the same code path runs with CPU-to-CPU copies.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("model", "layers", "text_layers")
STREAMS_TEXT = ("layers", "text_layers")  # modes that stream the text encoders' decoder layers


def parse_mode(value: Optional[str]) -> Optional[str]:
    if value is None or value in MODES:
        return value
    raise ConfigError(f"unknown offload {value!r}; accepted: {', '.join(MODES)} (or None)")


def _tensors(module: nn.Module, recurse: bool = True):
    """(owner, kind, name, tensor) for every parameter and buffer."""
    mods = module.modules() if recurse else [module]
    for m in mods:
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(m, kind).items():
                if t is not None:
                    yield m, kind, name, t


def _copy_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if type(t) in (torch.Tensor, nn.Parameter):
        out = t.to(device, non_blocking=True, copy=True)
    else:  # tensor subclasses (torchao's quantized weights) take only device / dtype in .to(), and cannot become
        with torch.inference_mode(False):  # a Parameter as an inference tensor
            out = t.to(device)
        if out is t:  # already there (the CPU "device" of the tests)
            return t
    return nn.Parameter(out, requires_grad=False) if isinstance(t, nn.Parameter) else out


def _pin(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu" or t.is_pinned() or type(t) not in (torch.Tensor, nn.Parameter):
        return t
    pinned = t.pin_memory()
    return nn.Parameter(pinned, requires_grad=False) if isinstance(t, nn.Parameter) else pinned


class _Weights:
    """One module's tensors: the resident CPU copy, and a device copy while it is loaded."""

    def __init__(self, module: nn.Module, device: torch.device, recurse: bool = True):
        self.module, self.device, self.recurse = module, device, recurse
        self.slots = []
        for owner, kind, name, t in _tensors(module, recurse):
            if device.type == "cuda":
                t = _pin(t)
                getattr(owner, kind)[name] = t
            self.slots.append((owner, kind, name, t))
        self.loaded: Optional[list] = None
        self.event = None
        self.installed = False

    def load(self, stream=None) -> None:
        """Start copying to the device (on ``stream`` when given); ``wait()`` before use."""
        if self.loaded is not None:
            return
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            self.loaded = [_copy_to(t, self.device) for *_, t in self.slots]
            if stream is not None:
                self.event = torch.cuda.Event()
                self.event.record(stream)

    def wait(self) -> None:
        if self.installed:
            return
        if self.loaded is None:
            self.load()
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)
            self.event = None
        for (owner, kind, name, _), t in zip(self.slots, self.loaded):
            getattr(owner, kind)[name] = t
        self.installed = True

    def release(self) -> None:
        for owner, kind, name, t in self.slots:
            getattr(owner, kind)[name] = t
        self.loaded, self.event, self.installed = None, None, False


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ModelOffload:
    """Keep one component on the device at a time; the component that starts running is brought in."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.active: Optional[_Weights] = None
        self.weights: dict[int, _Weights] = {}
        self.moves: list[str] = []  # names brought to the device, in order (for tests and logs)
        self._names: dict[int, str] = {}

    def attach(self, name: str, module: nn.Module, recurse: bool = True) -> None:
        """Bring ``module`` in when it or one of its direct children runs (``vae.decode`` only calls children)."""
        w = _Weights(module, self.device, recurse)
        self.weights[id(module)], self._names[id(module)] = w, name
        for m in [module, *module.children()]:
            m.register_forward_pre_hook(lambda _m, _a, _w=w: self.activate(_w))

    def activate(self, w: _Weights) -> None:
        if self.active is w:
            return
        if self.active is not None:
            self.active.release()
        w.load()
        w.wait()
        self.active = w
        self.moves.append(self._names[id(w.module)])

    def deactivate(self) -> None:
        """Send the active component back (a layer-offloaded transformer is about to run)."""
        if self.active is not None:
            self.active.release()
            self.active = None


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: entries of the model's top-level ``nn.ModuleList`` children, in order."""
    return [b for child in model.children() if isinstance(child, nn.ModuleList) for b in child]


class LayerOffload:
    """Block-by-block weights with ``prefetch`` blocks copied ahead on a side stream."""

    def __init__(self, model: nn.Module, device: torch.device | str, prefetch: int = 1,
                 blocks: Optional[Iterable[nn.Module]] = None):
        self.device = torch.device(device)
        self.blocks = list(blocks) if blocks is not None else blocks_of(model)
        if not self.blocks:
            raise ConfigError(f"offload='layers': {type(model).__name__} has no nn.ModuleList of blocks to offload; "
                              "use offload='model'")
        self.prefetch = prefetch
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.weights = [_Weights(b, self.device) for b in self.blocks]
        self.loads = 0  # block copies started (for tests and logs)
        self.current: Optional[int] = None  # the installed block: blocks never nest, so one at a time
        in_blocks = {id(t) for w in self.weights for *_, t in w.slots}
        for owner, kind, name, t in _tensors(model):  # everything else lives on the device
            if id(t) not in in_blocks:
                getattr(owner, kind)[name] = _copy_to(t, self.device) if t.device != self.device else t
        for i, block in enumerate(self.blocks):
            # submodules too: some models call a block's layers outside its forward (e.g. text K/V once per request)
            for m in block.modules():
                m.register_forward_pre_hook(lambda _m, _a, _i=i: self._before(_i))
            block.register_forward_hook(lambda _m, _a, _o, _i=i: self._after(_i))

    def _start(self, i: int) -> None:
        if 0 <= i < len(self.weights) and self.weights[i].loaded is None:
            self.loads += 1
            self.weights[i].load(self.stream)

    def _before(self, i: int) -> None:
        if self.weights[i].installed:
            return
        if self.current is not None:  # a layer called outside its block's forward (e.g. context K/V) left it in
            self.weights[self.current].release()
        self._start(i)
        for j in range(i + 1, i + 1 + self.prefetch):  # overlaps with block i's compute
            self._start(j % len(self.weights))  # wraps: the next step's first block
        self.weights[i].wait()
        self.current = i

    def _after(self, i: int) -> None:
        self.weights[i].release()
        self.current = None


def layer_stack(model: nn.Module) -> Optional[nn.ModuleList]:
    """A text encoder's decoder layers: its ``nn.ModuleList`` (at any depth) holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def apply(components: dict, mode: str, device: torch.device | str, denoisers: Iterable[str],
          prefetch: int = 1) -> dict:
    """Attach offloading to the loaded ``components`` (all on the CPU); returns the hook objects by name."""
    models = ModelOffload(device)
    hooks: dict = {"model": models}
    for name, comp in components.items():
        if not isinstance(comp, nn.Module):
            continue
        blocks = None
        if mode in STREAMS_TEXT and name.startswith("text_encoder") and name not in denoisers:
            blocks = layer_stack(comp)
        if (mode == "layers" and name in denoisers) or blocks is not None:
            hooks[name] = LayerOffload(comp, device, prefetch=prefetch, blocks=blocks)
            for m in [comp, *(c for c in comp.children() if not isinstance(c, nn.ModuleList))]:
                m.register_forward_pre_hook(lambda _m, _a: models.deactivate())  # step caches call children
        else:
            models.attach(name, comp)
    log.info("offload=%s to %s: %s", mode, device, ", ".join(n for n in components if isinstance(components[n], nn.Module)))
    return hooks
