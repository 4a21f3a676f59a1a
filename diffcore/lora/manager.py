"""The LoRA adapters loaded into one pipeline: load, select per request, fuse, unfuse, unload.

Loaded weights belong to the pipeline (one ``LoraManager`` per pipeline, ``pipeline.loras``); the
per-request choice lives on the Request (``params.loras``) and reaches the layers through the
contextvar in ``diffcore.lora.runtime``. Each targeted ``diffcore.models.linear.Linear`` holds its
adapters' matrices in ``layer.lora_layers`` (a dict replaced, never mutated, so a concurrent
forward sees either the old or the new set). Fusing edits the weights in place and keeps the
original tensors, so ``unfuse`` restores the base bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import attrs
import torch
from torch import nn

from ..errors import LoraError, LoraFormatError, LoraInUseError, LoraNotFoundError, LoraShapeError
from ..finite import first_non_finite
from ..records import resolve_ref
from .adapter import LayerLora, parse_peft_layout, split_text_encoder_keys
from .source import DIFFUSERS_WEIGHT_NAME, read_lora_file, resolve_lora_file

log = logging.getLogger(__name__)


@attrs.frozen
class LoraInfo:
    """What ``gen.loras`` reports for one adapter."""

    name: str
    source: str
    format: str  # "diffusers" or the plugin format that converted it (e.g. "flux-kohya")
    component: str  # the denoiser it targets ("transformer", "transformer_2")
    ranks: tuple[int, ...]  # distinct ranks of its layers (0: full-weight deltas only)
    targets: tuple[str, ...]  # module paths of the layers it changes
    fused: Optional[float]  # the weight it is fused with, or None when unfused
    load_seconds: float = 0.0


@attrs.define
class _Adapter:
    info: LoraInfo
    layers: dict[str, LayerLora]


def _few(items: Sequence[str], n: int = 5) -> str:
    items = sorted(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_weight(name: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise LoraError(name, f"weight must be a finite number, got {weight!r}")
    return float(weight)


def _converts(rec, tensors) -> bool:
    try:
        resolve_ref(rec.convert)(dict(tensors))
        return True
    except Exception:  # noqa: BLE001 - a format that cannot read the file is simply not its format
        return False


class LoraManager:
    """Adapters for the denoisers in ``components`` (module names such as ``transformer``)."""

    def __init__(self, components: Mapping[str, Any]):
        self.components = components
        self._adapters: dict[str, _Adapter] = {}
        self._backups: dict[tuple[str, str], tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self._lock = threading.RLock()
        # Adapter changes are ordered with the forwards that run under ``in_use``: unload waits for the forwards
        # using that adapter (new ones may no longer pick it); fuse / unfuse change every forward's weights, so
        # they wait for all running forwards and hold new ones back until done.
        self._changed = threading.Condition(self._lock)
        self._users: dict[str, int] = {}  # adapter -> running forwards that use it
        self._running = 0  # running forwards (any adapters)
        self._removing: set[str] = set()
        self._rewriting = False  # a fuse / unfuse is waiting or under way
        self._inside = threading.local()  # forwards of this thread (an adapter change from inside one would wait forever)

    # -- loading -----------------------------------------------------------------------------
    def load(self, source, name: Optional[str] = None, weight_name: Optional[str] = None, *,
             component: str = "transformer", formats: Sequence[Any] = (), other_formats: Sequence[Any] = (),
             ignore_text_encoder: bool = False) -> str:
        """Read, convert and attach one adapter (unapplied); returns its name.

        ``formats`` are the LoraFormatRegistration records for this model's class, ``other_formats``
        those of other families (only used to say what a foreign file is).
        """
        start = time.perf_counter()
        if not isinstance(source, (str, os.PathLike, Mapping)):
            raise LoraFormatError(str(name or source), f"source must be a file, folder or Hub id (str / Path) or a "
                                                       f"state dict, got {type(source).__name__}")
        if isinstance(source, Mapping):
            label = name or "adapter"
            tensors, metadata, where = dict(source), {}, "<state dict>"
        else:
            label = name or Path(os.fspath(source)).stem
            path = resolve_lora_file(source, weight_name, label)
            if name is None and path.name != DIFFUSERS_WEIGHT_NAME:  # the file's name, unless it is diffusers' default
                label = path.stem
            tensors, metadata = read_lora_file(path, label)
            where = str(path)
        bad = first_non_finite(tensors)
        if bad is not None:  # it would make every picture that uses it black
            raise LoraFormatError(label, f"tensor {bad!r} holds NaN or inf values: the file is corrupt (or was trained "
                                         "into a divergence); it cannot be used")
        with self._lock:
            if label in self._adapters:
                raise LoraError(label, "an adapter of that name is already loaded; unload it or pass another name=")
            model = self.components.get(component)
            if not isinstance(model, nn.Module):
                raise LoraError(label, f"the pipeline has no {component!r} module to apply it to")
            fmt, state = self._convert(label, tensors, formats, other_formats, type(model))
            state, te_keys = split_text_encoder_keys(state)
            if te_keys and not ignore_text_encoder:
                raise LoraFormatError(label, f"{len(te_keys)} key(s) target a text encoder (e.g. {_few(te_keys, 3)}); "
                                             "diffcore applies LoRAs to the denoiser only: pass ignore_text_encoder=True "
                                             "to load the rest, or use a denoiser-only LoRA")
            if te_keys:
                log.warning("LoRA %r: ignoring %d text-encoder key(s) as asked", label, len(te_keys))
            layers = parse_peft_layout(state, metadata if fmt == "diffusers" else {}, label)
            placed = self._match(label, model, layers, fmt, other_formats)
            for path_, layer in placed.items():
                layer.lora_layers = {**(getattr(layer, "lora_layers", None) or {}), label: layers[path_]}
            ranks = tuple(sorted({lw.rank for lw in layers.values()}))
            info = LoraInfo(label, where, fmt, component, ranks, tuple(sorted(layers)), None,
                            time.perf_counter() - start)
            self._adapters[label] = _Adapter(info, layers)
        log.info("loaded LoRA %r (%s, %d layers) in %.3fs", label, fmt, len(layers), info.load_seconds)
        return label

    @staticmethod
    def _convert(label, tensors, formats, other_formats, model_cls) -> tuple[str, dict]:
        keys = list(tensors)
        for rec in formats:
            if resolve_ref(rec.detect)(keys):
                try:
                    return rec.name, resolve_ref(rec.convert)(dict(tensors))
                except LoraError:
                    raise
                except Exception as e:  # a converter refusing a malformed file
                    raise LoraFormatError(label, f"looks like a {rec.name!r} LoRA but cannot be converted "
                                                 f"({type(e).__name__}: {e})") from e
        foreign = [rec for rec in other_formats if resolve_ref(rec.detect)(keys) and _converts(rec, tensors)]
        if foreign:
            made_for = "; ".join(f"{rec.name!r} for {', '.join(rec.modules)}" for rec in foreign)
            model = getattr(model_cls, "diffusers_class_name", None) or model_cls.__name__
            raise LoraFormatError(label, f"this is a LoRA of another model family ({made_for}); the model is a {model}")
        return "diffusers", tensors

    @staticmethod
    def _match(label, model: nn.Module, layers: dict[str, LayerLora], fmt: str, other_formats) -> dict[str, nn.Module]:
        placed, unmatched, wrong_type, shapes = {}, [], [], []
        for path, lw in layers.items():
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                unmatched.append(path)
                continue
            if not isinstance(layer, nn.Linear) or not hasattr(layer, "unpack"):
                wrong_type.append(f"{path} ({type(layer).__name__})")
                continue
            out_f, in_f = layer.out_features, layer.in_features
            if lw.down is not None and (lw.down.shape[1] != in_f or lw.up.shape[0] != out_f):
                shapes.append(f"{path}: LoRA {lw.up.shape[0]}x{lw.down.shape[1]} vs layer {out_f}x{in_f}")
            elif lw.diff is not None and tuple(lw.diff.shape) != (out_f, in_f):
                shapes.append(f"{path}: diff {tuple(lw.diff.shape)} vs layer {out_f}x{in_f}")
            elif any(b is not None and tuple(b.shape) != (out_f,) for b in (lw.up_bias, lw.diff_b)):
                shapes.append(f"{path}: bias delta does not have {out_f} entries")
            placed[path] = layer
        name = getattr(model, "diffusers_class_name", None) or type(model).__name__
        if unmatched:
            raise LoraFormatError(label, f"{len(unmatched)} of its {len(layers)} layers match no layer of the "
                                         f"{name} (read as {fmt!r} layout), e.g. {_few(unmatched)}; is it a LoRA "
                                         "for another model family?")
        if wrong_type:
            raise LoraFormatError(label, f"it targets layers that are not linear layers: {_few(wrong_type)}")
        if shapes:
            raise LoraShapeError(label, f"{len(shapes)} layer(s) do not fit this {name} (a LoRA for another model "
                                        f"size?): {'; '.join(sorted(shapes)[:3])}")
        for path, layer in placed.items():  # same device and precision as the layer it joins
            layers[path] = layers[path].to(layer.weight.device, layer.weight.dtype)
        return placed

    # -- ordering with generation ------------------------------------------------------------
    @contextlib.contextmanager
    def in_use(self, req) -> Iterator[Optional[dict]]:
        """Run a forward with ``req``'s adapters held: ``unload`` of one of them, and any ``fuse``/``unfuse``,
        waits until the forward is done; yields the selection (``request_selection``)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._rewriting)
            selection = self.request_selection(req) if req is not None else None
            names = list(selection or ())
            for name in names:
                self._users[name] = self._users.get(name, 0) + 1
            self._running += 1
        self._inside.depth = getattr(self._inside, "depth", 0) + 1
        try:
            yield selection
        finally:
            self._inside.depth -= 1
            with self._changed:
                self._running -= 1
                for name in names:
                    self._users[name] -= 1
                self._changed.notify_all()

    def _wait(self, name: str, what: str, ready, timeout: Optional[float]) -> None:
        if getattr(self._inside, "depth", 0):
            raise LoraInUseError(name, f"{what} was called from inside a generation (a callback), which it would "
                                       "wait for forever; call it after generate() returns")
        if not self._changed.wait_for(ready, timeout):
            busy = self._users.get(name, 0) if name in self._adapters else self._running
            raise LoraInUseError(name, f"{what}: {busy} running generation(s) still use it after {timeout:g} s; "
                                       "retry when they finish")

    def unload(self, name: str, timeout: Optional[float] = None) -> None:
        """Forget an adapter once no running forward uses it (new forwards may no longer pick it meanwhile);
        ``timeout`` (seconds; 0: do not wait) raises LoraInUseError instead of waiting longer."""
        with self._changed:
            adapter = self._get(name)
            if adapter.info.fused is not None:
                raise LoraError(name, "it is fused into the weights; call unfuse_lora() first")
            self._removing.add(name)
            try:
                self._wait(name, "unload_lora", lambda: not self._users.get(name), timeout)
            finally:
                self._removing.discard(name)
            model = self.components[adapter.info.component]
            for path in adapter.layers:
                layer = model.get_submodule(path)
                held = {k: v for k, v in layer.lora_layers.items() if k != name}
                layer.lora_layers = held or None
            del self._adapters[name]

    # -- selection ---------------------------------------------------------------------------
    def check_selection(self, selection: Optional[Mapping[str, float]]) -> dict[str, float]:
        """The request's ``{name: weight}`` checked against what is loaded and fused."""
        out = {}
        for name, weight in (selection or {}).items():
            out[name] = check_weight(name, weight)
            adapter = self._get(name)
            if adapter.info.fused is not None:
                raise LoraError(name, f"it is fused into the weights (weight {adapter.info.fused}), so every request "
                                      "already uses it; do not name it per request, or unfuse_lora() first")
        return out

    def request_selection(self, req) -> dict:
        """The adapters a Request's forward runs with: its ``params.loras``, or for a batch whose rows
        come from requests with different adapters, per-row weight tensors (0 where a row lacks one)."""
        rows = req.row_params
        if not rows:
            return self.check_selection(req.params.loras)
        per_row = [self.check_selection(p.loras) for p in rows]
        if all(r == per_row[0] for r in per_row):
            return per_row[0]
        names = dict.fromkeys(n for r in per_row for n in r)
        return {n: torch.tensor([r.get(n, 0.0) for r in per_row]) for n in names}

    def _get(self, name: str) -> _Adapter:
        adapter = self._adapters.get(name)
        if name in self._removing:
            raise LoraNotFoundError(name, "it is being unloaded (waiting for the generations that use it); load it "
                                          "again under another name to keep using it")
        if adapter is None:
            loaded = ", ".join(sorted(self._adapters)) or "none"
            raise LoraNotFoundError(name, f"no adapter of that name is loaded (loaded: {loaded}); load it with "
                                          "load_lora(source, name=...)")
        return adapter

    @property
    def infos(self) -> dict[str, LoraInfo]:
        return {name: a.info for name, a in self._adapters.items()}

    # -- fusing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _rewrite(self, what: str, timeout: Optional[float]):
        """Exclusive: running forwards finish first, new ones wait until the weights are rewritten."""
        with self._changed:
            self._wait("(all)", what, lambda: not self._rewriting, timeout)
            self._rewriting = True
            try:
                self._wait("(all)", what, lambda: not self._running, timeout)
                yield
            finally:
                self._rewriting = False
                self._changed.notify_all()

    def fuse(self, selection: Mapping[str, float], timeout: Optional[float] = None) -> None:
        """Merge ``{name: weight}`` into the weights (in place, float32 accumulation), once running forwards
        are done (later ones wait for it)."""
        if not isinstance(selection, Mapping):
            raise LoraError(str(selection), f"fuse_lora takes {{name: weight}}, got {type(selection).__name__}")
        with self._rewrite("fuse_lora", timeout):
            weights = {name: check_weight(name, w) for name, w in selection.items()}
            for name in weights:
                if self._get(name).info.fused is not None:
                    raise LoraError(name, "it is already fused; unfuse_lora() first to fuse it with another weight")
            if not weights:
                raise LoraError("(none)", "fuse_lora needs at least one {name: weight}")
            per_layer: dict[tuple[str, str], list[tuple[LayerLora, float]]] = {}
            for name, w in weights.items():
                adapter = self._adapters[name]
                for path, lw in adapter.layers.items():
                    per_layer.setdefault((adapter.info.component, path), []).append((lw, w))
            for component, path in per_layer:  # before changing anything
                weight = self.components[component].get_submodule(path).weight
                if type(weight) not in (torch.Tensor, nn.Parameter):
                    raise LoraError(next(iter(weights)), f"layer {path!r} holds {type(weight).__name__} (quantized) "
                                                         "weights, which cannot be fused; apply it per request")
            for (component, path), terms in per_layer.items():
                self._fuse_layer(component, path, terms)
            for name, w in weights.items():
                self._adapters[name].info = attrs.evolve(self._adapters[name].info, fused=w)

    def _fuse_layer(self, component: str, path: str, terms: list[tuple[LayerLora, float]]) -> None:
        layer = self.components[component].get_submodule(path)
        layer.unpack()
        weight, bias = layer.weight, layer.bias
        self._backups.setdefault((component, path), (weight.detach(), None if bias is None else bias.detach()))
        new_w, new_b = weight.detach().float(), None if bias is None else bias.detach().float()
        for lw, w in terms:
            dw, db = lw.delta_weight(), lw.delta_bias()
            if dw is not None:
                new_w = new_w + w * dw.to(new_w.device)
            if db is not None:
                new_b = (torch.zeros(layer.out_features, device=new_w.device) if new_b is None else new_b) + w * db.to(new_w.device)
        layer._parameters["weight"] = nn.Parameter(new_w.to(weight.dtype), requires_grad=False)
        if new_b is not None:
            layer._parameters["bias"] = nn.Parameter(new_b.to(weight.dtype if bias is None else bias.dtype),
                                                     requires_grad=False)

    def unfuse(self, timeout: Optional[float] = None) -> None:
        """Put back the weights saved by ``fuse`` (bit for bit) and mark every adapter unfused (ordered with
        running forwards as ``fuse`` is)."""
        with self._rewrite("unfuse_lora", timeout):
            for (component, path), (weight, bias) in self._backups.items():
                layer = self.components[component].get_submodule(path)
                layer._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
                layer._parameters["bias"] = None if bias is None else nn.Parameter(bias, requires_grad=False)
            self._backups.clear()
            for adapter in self._adapters.values():
                if adapter.info.fused is not None:
                    adapter.info = attrs.evolve(adapter.info, fused=None)
