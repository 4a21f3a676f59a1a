"""The registry: everything the plugins registered, flattened, validated and stamped with its origin."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import attrs

from . import records as R
from .errors import PluginError, RegistryError

# Hints for models whose plugin is not installed (only used to write a helpful error).
PLUGIN_HINTS = {
    "FluxPipeline": "diffcore-flux", "FluxKontextPipeline": "diffcore-flux",
    "QwenImagePipeline": "diffcore-qwen", "QwenImageEditPipeline": "diffcore-qwen",
    "QwenImageEditPlusPipeline": "diffcore-qwen", "WanPipeline": "diffcore-wan",
    "WanImageToVideoPipeline": "diffcore-wan",
}

_HOOKS = {
    "pipelines": ("register_pipelines", R.PipelineRegistration),
    "configs": ("register_configs", R.ConfigRegistration),
    "modules": ("register_modules", R.ModuleRegistration),
    "schedulers": ("register_schedulers", R.SchedulerRegistration),
    "stages": ("register_stages", R.StageRegistration),
    "attention_backends": ("register_attention_backends", R.AttentionBackendRegistration),
    "cache_policies": ("register_cache_policies", R.CachePolicyRegistration),
    "lora_formats": ("register_lora_formats", R.LoraFormatRegistration),
}


class Registry:
    def __init__(self):
        self.tables: dict[str, dict[str, R.Registered]] = {kind: {} for kind in _HOOKS}
        self._resolved: dict[tuple[str, str], Any] = {}

    @classmethod
    def build(cls, manager) -> "Registry":
        reg = cls()
        for kind, (hook, record_type) in _HOOKS.items():
            for info, records in manager.call_each(hook):
                for record in records:
                    if not isinstance(record, record_type):
                        manager.fail(info.name, f"{hook} returned {type(record).__name__}, expected {record_type.__name__}")
                        continue
                    stamped = R.Registered(record, info.name, info.distribution, info.version)
                    table = reg.tables[kind]
                    key = record.name
                    if key in table:
                        other = table[key]
                        manager.fail(info.name, f"conflicting {kind[:-1]} {key!r}: already registered by "
                                                f"{other.describe()}; refused from {stamped.describe()}",
                                     PluginError(key))
                        continue
                    table[key] = stamped
        for name, entry in reg.tables["attention_backends"].items():
            from .models import attention

            attention.register_backend(name, _LazyFn(entry.record.fn))
        return reg

    # -- lookups -----------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        """The resolved class/function registered as ``name``; unknown names list the alternatives."""
        table = self.tables[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            hint = ""
            if kind == "pipelines" and name in PLUGIN_HINTS:
                hint = f"; install it with: pip install {PLUGIN_HINTS[name]}"
            raise RegistryError(f"no {kind[:-1].replace('_', ' ')} named {name!r} is installed (installed: {known}){hint}")
        key = (kind, name)
        if key not in self._resolved:
            record = table[name].record
            if kind == "lora_formats":  # the record itself, with its functions imported
                self._resolved[key] = attrs.evolve(record, detect=R.resolve_ref(record.detect),
                                                   convert=R.resolve_ref(record.convert))
            else:
                self._resolved[key] = R.resolve_ref(record.fn if kind == "attention_backends" else record.cls)
        return self._resolved[key]

    def lora_formats(self, module_class: str) -> tuple[list, list]:
        """``(formats for module_class, formats for other classes)``: LoraFormatRegistration records."""
        recs = [self.get("lora_formats", name) for name in self.tables["lora_formats"]]
        return [r for r in recs if module_class in r.modules], [r for r in recs if module_class not in r.modules]

    def names(self, kind: str) -> list[str]:
        return sorted(self.tables[kind])

    def origin(self, kind: str, name: str) -> R.Registered:
        return self.tables[kind][name]

    def module_classes(self) -> "_LazyTable":
        return _LazyTable(self, "modules")

    def scheduler_classes(self) -> "_LazyTable":
        return _LazyTable(self, "schedulers")

    # -- model selection ---------------------------------------------------------------------
    def config_for_alias(self, model: str) -> Optional[R.ConfigRegistration]:
        for entry in self.tables["configs"].values():
            if model in entry.record.aliases:
                return entry.record
        return None

    def select_config(self, model: str, model_index, folder: Path) -> R.ConfigRegistration:
        """Pick the config registration for a model: by hub id or alias, then detectors, then the pipeline default."""
        pipeline = model_index.class_name
        candidates = [e.record for e in self.tables["configs"].values() if e.record.pipeline_name == pipeline]
        for rec in candidates:
            if model in rec.hf_ids or model in rec.aliases:
                return rec
        name_or_path = _name_or_path(folder)
        for rec in candidates:
            if name_or_path and name_or_path in rec.hf_ids:
                return rec
        for rec in candidates:
            if rec.detector is not None and R.resolve_ref(rec.detector)(model_index, folder):
                return rec
        for rec in candidates:
            if rec.default_for_pipeline:
                return rec
        if candidates:
            return candidates[0]
        self.get("pipelines", pipeline)  # raises the "not installed" error with a hint
        raise RegistryError(f"pipeline {pipeline!r} is installed but no plugin registered a config for it")


def _name_or_path(folder: Path) -> Optional[str]:
    try:
        return json.loads((Path(folder) / "model_index.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        return None


class _LazyTable:
    """A read-only mapping that resolves import strings on access."""

    def __init__(self, registry: Registry, kind: str):
        self.registry, self.kind = registry, kind

    def __getitem__(self, name: str):
        if name not in self.registry.tables[self.kind]:
            raise KeyError(name)
        return self.registry.get(self.kind, name)

    def __contains__(self, name: object) -> bool:
        return name in self.registry.tables[self.kind]

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def keys(self):
        return self.registry.tables[self.kind].keys()

    def __iter__(self):
        return iter(self.registry.tables[self.kind])

    def __len__(self) -> int:
        return len(self.registry.tables[self.kind])


class _LazyFn:
    def __init__(self, ref):
        self.ref, self.fn = ref, None

    def __call__(self, *args, **kwargs):
        if self.fn is None:
            self.fn = R.resolve_ref(self.ref)
        return self.fn(*args, **kwargs)
