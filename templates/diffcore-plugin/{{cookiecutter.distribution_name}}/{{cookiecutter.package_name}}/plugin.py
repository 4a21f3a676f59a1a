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
        PipelineRegistration("{{ p }}", _P + "{{ p }}", "{{ cookiecutter.family }}"),
{%- endfor %}
    ]


@hookimpl
def register_configs():
    # Add the Hub ids of real checkpoints (hf_ids=["org/name"]) so they select these configs.
    return [
{%- for p in pipelines %}
        ConfigRegistration("{{ cookiecutter.family.replace('_', '-') }}{% if not loop.first %}-{{ loop.index }}{% endif %}", "{{ p }}", _C + "{{ cookiecutter.class_prefix }}Config",
                           _C + "{{ cookiecutter.class_prefix }}SamplingParams", default_for_pipeline=True),
{%- endfor %}
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("{{ cookiecutter.class_prefix }}Transformer2DModel",
                               "{{ cookiecutter.package_name }}.transformer:{{ cookiecutter.class_prefix }}Transformer2DModel")]
