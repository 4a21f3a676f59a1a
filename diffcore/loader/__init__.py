"""Load Diffusers-format checkpoints: resolve the folder, read model_index.json, build components."""
from .components import CustomLoader, load_component
from .model_index import ComponentSpec, ConfigFileError, ModelIndex, read_json, read_model_index, resolve_model_path
from .safetensors_io import load_into_module
from .weight_files import check_variant, find_weight_files

__all__ = [
    "ComponentSpec",
    "ConfigFileError",
    "CustomLoader",
    "ModelIndex",
    "check_variant",
    "find_weight_files",
    "load_component",
    "load_into_module",
    "read_json",
    "read_model_index",
    "resolve_model_path",
]
