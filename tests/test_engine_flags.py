"""Engine flags come from EngineArgs in one place: every command that loads a model takes the same ones."""
import argparse

import attrs
import pytest

from diffcore.cli import build_parser
from diffcore.configs.engine_args import EngineArgs
from diffcore.configs.engine_flags import ENGINE_FLAGS, NOT_FLAGS, LoraFlag, engine_kwargs, parse_lora_flag, unflagged_fields
from diffcore.errors import ConfigError

MODEL_COMMANDS = ("generate", "serve")  # every command that loads a model
REQUIRED = {"generate": ["--prompt", "x", "--output", "o.png"], "serve": []}
# one value per flag, other than EngineArgs' default, so a flag that does not reach its field is seen
GIVEN = ["--device", "cpu:0", "--dtype", "bf16", "--attention-backend", "sdpa", "--compile", "--cache", "fbcache",
         "--cache-threshold", "0.25", "--quantization", "int8", "--gguf", "t.gguf", "vae=v.safetensors",
         "--offload", "layers", "--memory-preset", "gpu-48gb", "--variant", "fp16", "--revision", "v2", "--allow-pickle", "--allow-external-links", "--num-threads", "3",
         "--max-pixels", "4096", "--max-frames", "9", "--max-steps", "7", "--sp-degree", "2", "--cfg-parallel"]


def _subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _options(subparser) -> dict:
    """option string -> what the user sees and what argparse does with it."""
    return {a.option_strings[0]: (a.dest, type(a).__name__, a.type, a.nargs, a.choices, a.metavar, a.help, a.default)
            for a in subparser._actions if a.option_strings}


def test_every_engine_args_field_is_a_flag():
    assert unflagged_fields() == []
    fields = {a.name for a in attrs.fields(EngineArgs)}
    assert set(NOT_FLAGS) <= fields, "NOT_FLAGS names a field EngineArgs does not have"
    assert not set(NOT_FLAGS) & {f.field for f in ENGINE_FLAGS}
    assert {f.field for f in ENGINE_FLAGS} <= fields


def test_model_commands_take_the_same_engine_flags_spelled_the_same():
    subs = _subparsers()
    options = {name: _options(subs[name]) for name in MODEL_COMMANDS}
    for f in ENGINE_FLAGS:
        seen = {name: options[name].get(f.flag) for name in MODEL_COMMANDS}
        assert all(seen.values()), f"{f.flag} is missing from {[n for n, s in seen.items() if s is None]}"
        assert len(set(map(repr, seen.values()))) == 1, f"{f.flag} differs between commands: {seen}"
    for name in MODEL_COMMANDS:
        (lora,) = [a for a in subs[name]._actions if "--lora" in a.option_strings]
        assert lora.type is parse_lora_flag and lora.metavar == "[NAME=]PATH[:WEIGHT]"  # one syntax, own help


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_flag_reaches_its_engine_args_field(command):
    parser = build_parser()
    left_out = engine_kwargs(parser.parse_args([command, *REQUIRED[command]]))
    assert left_out == {}  # flags not given leave EngineArgs' defaults alone
    engine = EngineArgs.from_kwargs(**engine_kwargs(parser.parse_args([command, *REQUIRED[command], *GIVEN])))
    default = EngineArgs()
    for f in ENGINE_FLAGS:
        assert getattr(engine, f.field) != getattr(default, f.field), f"{f.flag} did not set EngineArgs.{f.field}"
    assert engine.gguf == {"transformer": engine.gguf["transformer"], "vae": engine.gguf["vae"]}
    assert (engine.quantization, engine.offload, engine.max_frames) == ("int8_weight_only", "layers", 9)


def test_bad_engine_flag_values_are_config_errors():
    parser = build_parser()
    for bad in (["--dtype", "int3"], ["--quantization", "int2"], ["--max-steps", "0"], ["--variant", "a.b"]):
        with pytest.raises(ConfigError):
            EngineArgs.from_kwargs(**engine_kwargs(parser.parse_args(["serve", *bad])))


def test_lora_flag_syntax():
    assert parse_lora_flag("a/b.safetensors") == LoraFlag(None, "a/b.safetensors", None)
    assert parse_lora_flag("a/b.safetensors:0.5") == LoraFlag(None, "a/b.safetensors", 0.5)
    assert parse_lora_flag("style=a/b.safetensors") == LoraFlag("style", "a/b.safetensors", None)
    assert parse_lora_flag("style=org/repo:-0.25") == LoraFlag("style", "org/repo", -0.25)
    assert parse_lora_flag("C:/x/b.safetensors") == LoraFlag(None, "C:/x/b.safetensors", None)
    assert parse_lora_flag("dir/a=b.safetensors") == LoraFlag(None, "dir/a=b.safetensors", None)  # '=' in a path
    assert parse_lora_flag("=b.safetensors:2") == LoraFlag(None, "=b.safetensors", 2.0)


PRESETS = {"gpu-80gb": ("model", None), "gpu-48gb": ("text_layers", "int8_weight_only"), "gpu-24gb": ("layers", None)}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_memory_preset_is_one_flag_resolving_to_its_engine_args(command, preset):
    """--memory-preset fills offload / quantization on generate and serve alike (and in Python); an explicit
    --offload or --quantization wins over the preset."""
    parser = build_parser()
    engine = EngineArgs.from_kwargs(**engine_kwargs(parser.parse_args([command, *REQUIRED[command],
                                                                        "--memory-preset", preset])))
    assert (engine.offload, engine.quantization) == PRESETS[preset]
    assert EngineArgs(memory_preset=preset) == engine
    mine = EngineArgs.from_kwargs(**engine_kwargs(parser.parse_args(
        [command, *REQUIRED[command], "--memory-preset", preset, "--offload", "model", "--quantization", "int8_dynamic"])))
    assert (mine.offload, mine.quantization, mine.memory_preset) == ("model", "int8_dynamic", preset)


def test_unknown_memory_preset_is_refused():
    with pytest.raises(ConfigError, match="unknown memory_preset 'gpu-12gb'; accepted: gpu-80gb, gpu-48gb, gpu-24gb"):
        EngineArgs(memory_preset="gpu-12gb")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--memory-preset", "gpu-12gb"])
