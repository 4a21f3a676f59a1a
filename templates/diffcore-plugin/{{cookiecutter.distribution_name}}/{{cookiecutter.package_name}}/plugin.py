{%- set pipelines = cookiecutter.pipeline_class_names.split(',') | map('trim') | list -%}
"""diffcore entry point for {{ cookiecutter.family }}: hook implementations only.

diffcore imports this module at start-up to list the plugin, so it must stay cheap: no torch, and
classes are named by import strings that diffcore resolves when a model is loaded.
"""
from diffcore.hookspecs import hookimpl
from diffcore.records import ConfigRegistration, ModuleRegistration, PipelineRegistration

_P = "{{ cookiecutter.package_name }}.pipelines:"
_C = "{{ cookiecutter.package_name }}.configs:"


@hookimpl
def register_pipelines():
    return [
{%- for p in pipelines %}
        PipelineRegistration("{{ p }}", _P + "{{ p }}", "{{ cookiecutter.family }}: {{ p }}"),
{%- endfor %}
    ]


@hookimpl
def register_configs():
    # Add the Hub ids of real checkpoints (hf_ids=["org/name"]) and aliases so they select these configs; when
    # several checkpoints share a pipeline class (a distilled and a base model), add a config per checkpoint with
    # a detector(model_index, folder) -> bool for local folders.
    return [
{%- for p in pipelines %}
{%- set task = p[:-8].replace(cookiecutter.class_prefix, '', 1) if p.startswith(cookiecutter.class_prefix) else p[:-8] %}
        ConfigRegistration("{{ cookiecutter.family.replace('_', '-') }}{% if not loop.first %}-{{ task.lower() or loop.index }}{% endif %}", "{{ p }}", _C + "{{ cookiecutter.class_prefix }}Config",
                           _C + "{{ cookiecutter.class_prefix }}SamplingParams", default_for_pipeline=True),
{%- endfor %}
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("{{ cookiecutter.class_prefix }}Transformer2DModel",
                               "{{ cookiecutter.package_name }}.transformer:{{ cookiecutter.class_prefix }}Transformer2DModel")]
