"""diffcore entry point for the bundled demo model: hook implementations only, no torch import."""
from pathlib import Path

from diffcore.hookspecs import hookimpl
from diffcore.records import ConfigRegistration

_C = "diffcore_demo.configs:"


def model_path() -> Path:
    """The shipped Diffusers-format folder (package data)."""
    return Path(__file__).resolve().parent / "model"


@hookimpl
def register_configs():
    # model_index.json says "_name_or_path": "diffcore/demo", so the folder is recognised by path too.
    return [ConfigRegistration("demo", "FluxPipeline", _C + "DemoConfig", _C + "DemoSamplingParams",
                               hf_ids=["diffcore/demo"], aliases=["demo", "diffcore/demo"],
                               source="diffcore_demo.plugin:model_path")]
