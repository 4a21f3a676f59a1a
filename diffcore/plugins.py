"""The plugin manager: entry-point discovery with each plugin isolated from the others.

A plugin that fails to import, is built for another diffcore version, or raises in a hook is
reported (a warning, and ``diffcore plugins`` lists it) while every other plugin keeps working.
``DIFFCORE_STRICT_PLUGINS=1`` turns those failures into exceptions. ``DIFFCORE_PLUGINS`` (comma list)
is an allow-list; ``DIFFCORE_TRACE_PLUGINS=1`` logs every hook call.

Conflicts: plugins are admitted into the registry whole, built-ins first, then the plugins an earlier
build of this manager admitted, then the rest by distribution name; a plugin claiming a name an
admitted one holds is disabled (all of its records withdrawn) and both are reported.
"""
from __future__ import annotations

import logging
import os
import warnings
from importlib import metadata
from typing import Any, Iterable, Optional

import attrs
import pluggy

from . import __version__, hookspecs
from .errors import PluginError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "diffcore"
BUILTIN = "diffcore.builtin"
BUILTIN_NAME = "diffcore"  # the plugin name the built-ins register under


@attrs.define
class PluginInfo:
    name: str
    distribution: Optional[str] = None
    version: Optional[str] = None
    module: Any = None


@attrs.define
class PluginLoadError:
    plugin: str
    error: str


def strict_mode() -> bool:
    return os.environ.get("DIFFCORE_STRICT_PLUGINS", "") not in ("", "0", "false")


def _requirement_error(dist: metadata.Distribution) -> Optional[str]:
    """Why ``dist`` cannot run on this diffcore (from its declared ``diffcore`` requirement), or None."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # packaging is a transformers dependency; without it, skip the check
        return None
    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except Exception:
            continue
        if req.name.lower() == "diffcore" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            if req.specifier and not req.specifier.contains(Version(__version__), prereleases=True):
                return (f"{dist.metadata['Name']} {dist.version} requires diffcore{req.specifier}, but diffcore "
                        f"{__version__} is installed; upgrade the plugin or install a matching diffcore")
    return None


class PluginManager:
    """Loads built-in components and installed plugins; ``registry`` is built from their hooks."""

    def __init__(self, load_entrypoints: bool = True, strict: Optional[bool] = None,
                 plugins: Iterable[tuple[str, Any]] = ()):
        self.strict = strict_mode() if strict is None else strict
        self.pm = pluggy.PluginManager("diffcore")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.errors: list[PluginLoadError] = []
        self.admitted: list[str] = []  # plugins the last registry build admitted, in admission order
        self.disabled: dict[str, str] = {}  # plugins the last build refused whole (a conflict), with the reason
        if os.environ.get("DIFFCORE_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda msg: log.warning("pluggy: %s", msg.rstrip()))
            self.pm.enable_tracing()
        import importlib

        self.register(importlib.import_module(BUILTIN), BUILTIN_NAME, "diffcore", __version__)
        if load_entrypoints:
            self.load_entrypoints()
        for name, module in plugins:
            self.register(module, name)
        self._registry = None

    def fail(self, plugin: str, message: str, exc: Optional[BaseException] = None, disabled: bool = True) -> None:
        """Record (and warn about) a plugin's failure; ``disabled=False`` for a failure that costs it nothing
        more than the call that failed (a detector that raised)."""
        self.errors.append(PluginLoadError(plugin, message))
        state = "disabled" if disabled else "error"
        warnings.warn(f"diffcore plugin {plugin!r} {state}: {message}", RuntimeWarning, stacklevel=3)
        if self.strict:
            raise PluginError(f"plugin {plugin!r}: {message}") from exc

    def priority(self, names: Iterable[str]) -> list[str]:
        """Admission order (first wins a conflict): built-ins, then the plugins an earlier registry build
        admitted (in that order), then the others by distribution name (plugin name without one)."""
        names = list(names)
        kept = [n for n in [BUILTIN_NAME, *self.admitted] if n in names]
        kept = list(dict.fromkeys(kept))

        def key(name: str) -> tuple[str, str]:
            info = self.plugins.get(name)
            return ((info.distribution if info and info.distribution else name).lower(), name)

        return kept + sorted((n for n in names if n not in kept), key=key)

    def register(self, module: Any, name: str, distribution: Optional[str] = None, version: Optional[str] = None) -> None:
        try:
            self.pm.check_pending()  # noqa: B018 - pending hooks of earlier plugins
            self.pm.register(module, name=name)
            self.pm.check_pending()
        except Exception as exc:  # a typo'd hook name, a duplicate registration
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            self.fail(name, f"{type(exc).__name__}: {exc}", exc)
            return
        self.plugins[name] = PluginInfo(name, distribution, version, module)
        self._registry = None

    def load_entrypoints(self) -> None:
        allow = os.environ.get("DIFFCORE_PLUGINS")
        allowed = {a.strip() for a in allow.split(",") if a.strip()} if allow else None
        entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        if allowed is not None:
            installed = sorted({ep.name for ep in entry_points})
            for name in sorted(allowed - set(installed) - {BUILTIN_NAME}):
                message = (f"DIFFCORE_PLUGINS names {name!r}, which is not installed "
                           f"(installed plugins: {', '.join(installed) or 'none'})")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                if self.strict:
                    raise PluginError(message)
        for ep in entry_points:
            if allowed is not None and ep.name not in allowed:
                continue
            if ep.name in self.plugins:
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            if dist is not None:
                problem = _requirement_error(dist)
                if problem:
                    self.fail(ep.name, problem)
                    continue
            try:
                module = ep.load()
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # anything a plugin may raise at import: a
                # sys.exit() there must not end the host program (`diffcore plugins` exited 0 with no output)
                self.fail(ep.name, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}", exc)
                continue
            self.register(module, ep.name, dist_name, version)

    @property
    def registry(self):
        if self._registry is None:
            from .registry import Registry

            self._registry = Registry.build(self)
        return self._registry

    def call_each(self, hook_name: str) -> list[tuple[PluginInfo, list]]:
        """Call one hook on every plugin separately, so one plugin's exception costs only that plugin."""
        results = []
        hook = getattr(self.pm.hook, hook_name)
        trace = self.pm.trace.root.get("hook")  # writes only when DIFFCORE_TRACE_PLUGINS set a writer
        for impl in hook.get_hookimpls():  # registration order (pluggy *calls* them last-first)
            plugin_name = self.pm.get_name(impl.plugin)
            trace(f"{hook_name} [{plugin_name}]")
            info = self.plugins.get(plugin_name) or PluginInfo(plugin_name)
            try:
                records = impl.function() or []
                if not isinstance(records, (list, tuple)):
                    raise PluginError(f"{hook_name} must return a list of records, got {type(records).__name__}")
            except (Exception, SystemExit) as exc:
                if isinstance(exc, PluginError) and self.strict:
                    raise
                self.fail(plugin_name, f"hook {hook_name} raised {type(exc).__name__}: {exc}", exc)
                continue
            results.append((info, list(records)))
        return results


_default: Optional[PluginManager] = None


def get_plugin_manager(refresh: bool = False) -> PluginManager:
    """The process-wide manager (built on first use)."""
    global _default
    if _default is None or refresh:
        _default = PluginManager()
    return _default


def set_plugin_manager(manager: Optional[PluginManager]) -> Optional[PluginManager]:
    """Swap the process-wide manager (tests use this for isolation); returns the previous one."""
    global _default
    previous, _default = _default, manager
    return previous
