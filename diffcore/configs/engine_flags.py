"""The command-line flags of EngineArgs, defined once: every command that loads a model (``generate``,
``serve``, and any later one) adds the same flags with the same spelling, and gets back only the options
the user gave, so the defaults stay EngineArgs' own. ``--lora [NAME=]PATH[:WEIGHT]`` is parsed here too."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

import attrs

from ..offload import MODES
from ..quantization import SCHEMES
from . import budget
from .engine_args import EngineArgs
from .memory_presets import PRESETS


def gguf_files(values) -> Optional[dict]:
    """``--gguf PATH`` (the transformer) or ``--gguf NAME=PATH`` (any diffcore model component)."""
    if not values:
        return None
    files = {}
    for v in values:
        name, sep, path = v.partition("=")
        files[name if sep else "transformer"] = path if sep else v
    return files


@attrs.frozen
class Flag:
    """One EngineArgs field as a command-line flag (``argparse.add_argument`` keywords in ``options``;
    ``convert`` turns the parsed value into the field's value)."""

    field: str
    help: str
    options: dict = attrs.field(factory=dict)
    convert: Optional[Callable[[Any], Any]] = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


ENGINE_FLAGS: tuple[Flag, ...] = (
    Flag("device", "torch device, e.g. cpu, cuda, cuda:1 (default cpu)"),
    Flag("dtype", "force a dtype for every component, e.g. float32 (default: the model's per-component precisions)"),
    Flag("attention_backend", "attention backend name (default: the best available)"),
    Flag("compile", "torch.compile the denoiser", {"action": "store_true"}),
    Flag("cache", "step-cache policy, e.g. fbcache or teacache (default: none)"),
    Flag("cache_threshold", "the step cache's reuse threshold (default 0.1)", {"type": float}),
    Flag("quantization", f"quantize the transformer(s) with torchao: {', '.join(SCHEMES)} (fp8: GPU)"),
    Flag("memory_preset", "one flag per GPU size: quantization + offload that fit it (gpu-80gb, gpu-48gb, gpu-24gb: "
                          "docs/api.md); an explicit --offload / --quantization wins", {"choices": list(PRESETS)}),
    Flag("gguf", "load the transformer (or component NAME) from a .gguf (or single-file .safetensors) file, in "
                 "Diffusers names or the model's original layout (docs/api.md lists the layouts); the rest comes "
                 "from --model", {"nargs": "+", "metavar": "[NAME=]PATH"}, gguf_files),
    Flag("offload", "keep weights in CPU memory, on the device only while they run (whole components / "
                    "transformer and text-encoder blocks / text-encoder layers only)", {"choices": MODES}),
    Flag("variant", "load the weight files of this variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)"),
    Flag("revision", "Hugging Face Hub revision (branch, tag or commit) of --model"),
    Flag("allow_pickle", "allow loading pickle (.bin/.pt) weights: runs code from the file", {"action": "store_true"}),
    Flag("allow_external_links", "follow links in the model folder that lead outside it (refused by default: "
                                 "docs/api.md)", {"action": "store_true"}),
    Flag("num_threads", "torch CPU threads (default: torch's)", {"type": int}),
    *(Flag(name, f"budget: {what} (default {budget.DEFAULTS[name]:,} or {budget.ENV[name]})", {"type": int})
      for name, what in (("max_pixels", "most pixels per frame"), ("max_frames", "most video frames"),
                         ("max_steps", "most denoising steps"))),
    Flag("sp_degree", "Ulysses sequence-parallel degree (launch sp-degree x (2 with --cfg-parallel) ranks with "
                      "torchrun)", {"type": int}),
    Flag("cfg_parallel", "run the conditional and unconditional CFG branches on two ranks", {"action": "store_true"}),
)

# EngineArgs fields that are not flags, and why (the flag test holds this list to EngineArgs' fields).
NOT_FLAGS = {
    "progress": "a terminal choice, not an engine one: generate has --quiet, serve never draws progress bars",
}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Every ENGINE_FLAGS flag, in one group; a flag left out is absent from the parsed namespace."""
    group = parser.add_argument_group("engine (EngineArgs; the same flags on every command)")
    for f in ENGINE_FLAGS:
        group.add_argument(f.flag, dest=f.field, default=argparse.SUPPRESS, help=f.help, **f.options)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineArgs keywords of the flags given (``EngineArgs.from_kwargs`` / ``from_pretrained`` take them)."""
    return {f.field: f.convert(getattr(args, f.field)) if f.convert else getattr(args, f.field)
            for f in ENGINE_FLAGS if hasattr(args, f.field)}


def flag_fields() -> set[str]:
    return {f.field for f in ENGINE_FLAGS}


def unflagged_fields() -> list[str]:
    """EngineArgs fields with neither a flag nor a reason in NOT_FLAGS (the flag test wants none)."""
    return [a.name for a in attrs.fields(EngineArgs) if a.name not in flag_fields() and a.name not in NOT_FLAGS]


@attrs.frozen
class LoraFlag:
    """``--lora [NAME=]PATH[:WEIGHT]``: the adapter's name (None: from the file), its source and weight
    (None: not given)."""

    name: Optional[str]
    path: str
    weight: Optional[float]


def parse_lora_flag(text: str) -> LoraFlag:
    """``[NAME=]PATH[:WEIGHT]``; a ``:`` suffix that is not a number belongs to the path (``C:/x``), and a
    ``NAME=`` prefix is a name only when it holds no path separator."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "/" in name or "\\" in name:
        name, rest = None, text
    path, sep, weight = rest.rpartition(":")
    if sep:
        try:
            return LoraFlag(name, path, float(weight))
        except ValueError:
            pass
    return LoraFlag(name, rest, None)


def add_lora_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--lora", action="append", type=parse_lora_flag, metavar="[NAME=]PATH[:WEIGHT]", help=help)
