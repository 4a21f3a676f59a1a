"""Shared plumbing for diffcore schedulers: config handling, step/begin index bookkeeping, cloning.

Schedulers are built from a Diffusers ``scheduler_config.json`` dict; the loader picks the class by
``_class_name`` == ``diffusers_class_name``. Numerics live in the subclasses.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, ClassVar, Mapping

import torch

log = logging.getLogger(__name__)

_warned: set[tuple[str, str]] = set()


class SchedulerConfig(dict):
    """The constructor arguments a scheduler was built with; readable as keys or attributes
    (pipelines written against Diffusers use both ``config.shift`` and ``config.get("shift")``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class SchedulerBase:
    """Base class: subclasses call ``self._store_config(locals())`` first thing in ``__init__``.

    ``set_timesteps`` resets all per-request state, so one instance can serve many requests one
    after another; use :meth:`clone` for an independent instance (e.g. concurrent requests).
    """

    diffusers_class_name: ClassVar[str] = ""
    order: ClassVar[int] = 1
    init_noise_sigma: float = 1.0
    # index_for_timestep: raise (False) or fall back to the last index (True) when t is not in the schedule
    _missing_timestep_is_last: ClassVar[bool] = False

    config: SchedulerConfig
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    # ---- config -------------------------------------------------------------------------------
    @classmethod
    def init_arg_names(cls) -> list[str]:
        return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: Any = None, **overrides: Any):
        """Build from a ``scheduler_config.json`` dict; ``_``-prefixed keys are metadata and skipped,
        unknown keys are ignored with a one-time warning (a newer Diffusers may add keys). A value of the
        wrong type, or one the constructor rejects, is a ConfigFileError naming ``source`` and the field."""
        from ..loader.config_types import build, check_config

        accepted = set(cls.init_arg_names())
        kwargs = {}
        for key, value in {**dict(config), **overrides}.items():
            if key.startswith("_"):
                continue
            if key in accepted:
                kwargs[key] = value
            elif (cls.__name__, key) not in _warned:
                _warned.add((cls.__name__, key))
                log.warning("%s ignores unknown config key %r", cls.__name__, key)
        source = source if source is not None else f"the {cls.__name__} config"
        check_config(cls.__init__, kwargs, source)
        _check_shifts(kwargs, source)
        return build(lambda: cls(**kwargs), cls, source)

    def _store_config(self, values: Mapping[str, Any]) -> None:
        self.config = SchedulerConfig({n: values[n] for n in self.init_arg_names()})

    def flow_shift_key(self) -> str | None:
        """The config key holding this scheduler's fixed flow shift, or None where it has none
        (schedulers override it)."""
        return None

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.config)})"

    # ---- step index bookkeeping (same semantics as Diffusers) ----------------------------------
    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step``; set on the first ``step`` call."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index, set by a pipeline that starts mid-schedule (img2img) via ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule; the second match if it appears twice, so that a
        schedule entered mid-way (img2img) never skips a sigma."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        hits = (schedule_timesteps == timestep).nonzero()
        if len(hits) == 0:
            if self._missing_timestep_is_last:
                return len(self.timesteps) - 1
            raise ValueError(f"timestep {timestep!r} is not in the scheduler's timesteps")
        return hits[1 if len(hits) > 1 else 0].item()

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Flow schedulers do not scale the model input."""
        return sample


def _check_shifts(kwargs: Mapping[str, Any], source) -> None:
    """A fixed shift outside the sane range (``configs.ranges``) would give NaN timesteps at the first request."""
    from ..configs.ranges import shift_problem
    from ..errors import ConfigFileError

    for key in ("shift", "flow_shift"):
        value = kwargs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            finite = math.isfinite(value) and value > 0
            problem = shift_problem(value) if finite else f"must be a finite number > 0, got {value!r}"
            if problem:
                raise ConfigFileError(f"{source}: {key} {problem}", file=source, field=key)


def time_shift(kind: str, mu: float, sigmas, exponent: float = 1.0):
    """Resolution-dependent shift of a sigma schedule (numpy or torch), as in FLUX / SD3:
    exponential: e^mu / (e^mu + (1/s - 1)^exponent); linear: mu / (mu + (1/s - 1)^exponent)."""
    if kind == "exponential":
        e = math.exp(mu)
        return e / (e + (1 / sigmas - 1) ** exponent)
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1) ** exponent)
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def stretch_to_terminal(sigmas, shift_terminal: float):
    """Rescale ``1 - sigma`` so the schedule ends exactly at ``shift_terminal`` (LTX-Video / Qwen-Image)."""
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - (one_minus / scale)


def with_flow_shift(scheduler, shift: float):
    """A fresh copy of ``scheduler`` whose fixed flow shift is ``shift``: what diffusers users write as
    ``Scheduler.from_config(scheduler.config, flow_shift=...)``. A SamplingParamError where the schedule
    has no fixed shift (no flow sigmas, shifted by the image size, or a scheduler without the hook)."""
    from ..errors import SamplingParamError

    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None) or {}
    if config.get("use_dynamic_shifting"):
        raise SamplingParamError("flow_shift", f"this model's {name} shifts its schedule by the image size "
                                               "(use_dynamic_shifting in scheduler_config.json), so a fixed "
                                               "flow_shift does not apply; leave it unset")
    key = scheduler.flow_shift_key() if hasattr(scheduler, "flow_shift_key") else None
    if key is None:
        raise SamplingParamError("flow_shift", f"this model's {name} (as its scheduler_config.json sets it up) "
                                               "has no flow shift; leave it unset")
    return type(scheduler).from_config(config, **{key: float(shift)})
