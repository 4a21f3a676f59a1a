"""The registry: everything the plugins registered, flattened, validated and stamped with its origin."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Optional

import attrs

from . import records as R
from .errors import PluginError, RegistryError



def plugin_hint(pipeline_name: str) -> Optional[str]:
    """The distribution a plugin for a Diffusers pipeline class is conventionally named after: the class
    name's first word (``<Family>ImageEditPipeline`` -> ``diffcore-<family>``). Only for error messages."""
    match = re.match(r"[A-Z][a-z0-9]+", pipeline_name)
    return f"diffcore-{match.group(0).lower()}" if match and pipeline_name.endswith("Pipeline") else None


_HOOKS = {
    "pipelines": ("register_pipelines", R.PipelineRegistration),
    "configs": ("register_configs", R.ConfigRegistration),
    "modules": ("register_modules", R.ModuleRegistration),
    "schedulers": ("register_schedulers", R.SchedulerRegistration),
    "stages": ("register_stages", R.StageRegistration),
    "attention_backends": ("register_attention_backends", R.AttentionBackendRegistration),
    "cache_policies": ("register_cache_policies", R.CachePolicyRegistration),
    "lora_formats": ("register_lora_formats", R.LoraFormatRegistration),
    "compositions": ("register_compositions", R.CompositionRegistration),
}


def _claimed_keys(kind: str, record) -> list[tuple]:
    """The names a record holds: its ``name`` in its kind, and for configs every alias (one namespace for
    all pipelines: ``from_pretrained("alias")``) and every HF id (per pipeline, as ``select_config`` reads them)."""
    keys = [(kind, record.name)]
    if kind == "configs":
        keys += [("aliases", a) for a in record.aliases]
        keys += [("hf_ids", record.pipeline_name, h) for h in record.hf_ids]
    if kind == "compositions":  # one composition per task of a pipeline
        keys.append(("tasks", record.pipeline_name, record.task))
    return keys


_WHAT = {"aliases": "alias", "hf_ids": "HF id", "tasks": "task", "cache_policies": "cache policy"}


def _conflict(claims: dict, stamped: dict[str, list]) -> Optional[str]:
    """Why a plugin's records (``{kind: [Registered]}``) cannot be admitted beside ``claims``, or None."""
    own: dict[tuple, R.Registered] = {}
    for kind, entries in stamped.items():
        for entry in entries:
            for key in _claimed_keys(kind, entry.record):
                other = claims.get(key) or own.get(key)
                if other is not None:
                    what = _WHAT.get(key[0]) or key[0][:-1].replace("_", " ")
                    holder = "itself" if other.plugin == entry.plugin else other.describe()
                    return (f"conflicting {what} {key[-1]!r}: already registered by {holder}; "
                            f"{entry.describe()} is disabled and none of its records are registered "
                            "(uninstall one of the two distributions, or leave one out with DIFFCORE_PLUGINS)")
                own[key] = entry
    return None


class Registry:
    def __init__(self):
        self.tables: dict[str, dict[str, R.Registered]] = {kind: {} for kind in _HOOKS}
        self._resolved: dict[tuple[str, str], Any] = {}
        self.report = _warn  # (plugin, message, exc): set by build() to the manager's failure reporter

    @classmethod
    def build(cls, manager) -> "Registry":
        """Collect every plugin's records, then admit plugins whole, in ``manager.priority`` order.

        A plugin that claims a name an admitted plugin already holds (any kind's ``name``, a config's
        alias, or a config's HF id for the same pipeline) is disabled: none of its records are
        registered, so the plugin that was there first keeps working and nothing is half-registered.
        """
        reg = cls()
        reg.report = lambda plugin, message, exc=None: manager.fail(plugin, message, exc, disabled=False)
        collected: dict[str, tuple[Any, dict[str, list]]] = {}
        for kind, (hook, record_type) in _HOOKS.items():
            for info, records in manager.call_each(hook):
                kinds = collected.setdefault(info.name, (info, {}))[1]
                for record in records:
                    if not isinstance(record, record_type):
                        manager.fail(info.name, f"{hook} returned {type(record).__name__}, expected {record_type.__name__}")
                        continue
                    kinds.setdefault(kind, []).append(record)
        claims: dict[tuple, R.Registered] = {}
        admitted, manager.disabled = [], {}
        for name in manager.priority(list(collected)):
            info, kinds = collected[name]
            stamped = {kind: [R.Registered(r, info.name, info.distribution, info.version) for r in records]
                       for kind, records in kinds.items()}
            problem = _conflict(claims, stamped)
            if problem is not None:
                manager.disabled[name] = problem
                manager.fail(name, problem, PluginError(problem))
                continue
            for kind, entries in stamped.items():
                for entry in entries:
                    reg.tables[kind][entry.record.name] = entry
                    for key in _claimed_keys(kind, entry.record):
                        claims[key] = entry
            admitted.append(name)
        manager.admitted = admitted
        return reg

    # -- lookups -----------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        """The resolved class/function registered as ``name``; unknown names list the alternatives."""
        table = self.tables[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            hint = ""
            if kind == "pipelines" and plugin_hint(name):
                hint = (f"; install the plugin that serves it, by convention: pip install {plugin_hint(name)} "
                        "(`diffcore plugins` lists what is installed)")
            singular = kind[:-3] + "y" if kind.endswith("ies") else kind[:-1]  # cache_policies -> cache policy
            raise RegistryError(f"no {singular.replace('_', ' ')} named {name!r} is installed (installed: {known}){hint}")
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

    def compositions_for(self, pipeline_name: str) -> dict[str, Any]:
        """``{task: ComposedPipelineBase subclass}``: the extra compositions registered for a pipeline."""
        return {e.record.task: self.get("compositions", name) for name, e in sorted(self.tables["compositions"].items())
                if e.record.pipeline_name == pipeline_name}

    def names(self, kind: str) -> list[str]:
        return sorted(self.tables[kind])

    def origin(self, kind: str, name: str) -> R.Registered:
        return self.tables[kind][name]

    def module_classes(self) -> "_LazyTable":
        return _LazyTable(self, "modules")

    def scheduler_classes(self) -> "_LazyTable":
        return _LazyTable(self, "schedulers")

    # -- model selection ---------------------------------------------------------------------
    def _detects(self, entry: R.Registered, model_index, folder: Path) -> bool:
        """Run one detector; one that raises is reported against its plugin and counts as "no match"."""
        try:
            return bool(R.resolve_ref(entry.record.detector)(model_index, folder))
        except Exception as exc:
            self.report(entry.plugin, f"detector of config {entry.record.name!r} raised {type(exc).__name__}: {exc}; "
                                      "skipped, other configs are tried", exc)
            return False

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
        name_or_path = getattr(model_index, "name_or_path", None)
        for rec in candidates:
            if name_or_path and name_or_path in rec.hf_ids:
                return rec
        for entry in self.tables["configs"].values():
            rec = entry.record
            if rec.pipeline_name == pipeline and rec.detector is not None and self._detects(entry, model_index, folder):
                return rec
        for rec in candidates:
            if rec.default_for_pipeline:
                return rec
        if candidates:
            return candidates[0]
        self.get("pipelines", pipeline)  # raises the "not installed" error with a hint
        raise RegistryError(f"pipeline {pipeline!r} is installed but no plugin registered a config for it")


def _warn(plugin: str, message: str, exc: Optional[BaseException] = None) -> None:
    warnings.warn(f"diffcore plugin {plugin!r}: {message}", RuntimeWarning, stacklevel=3)


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
