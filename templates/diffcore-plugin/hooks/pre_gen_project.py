"""Refuse names that would render a broken plugin, before cookiecutter writes any file."""
import keyword
import re
import sys

FAMILY = {{ cookiecutter.family | jsonify }}
PIPELINES = {{ cookiecutter.pipeline_class_names | jsonify }}
PACKAGE = {{ cookiecutter.package_name | jsonify }}
DISTRIBUTION = {{ cookiecutter.distribution_name | jsonify }}
PREFIX = {{ cookiecutter.class_prefix | jsonify }}
REQUIREMENT = {{ cookiecutter.diffcore_requirement | jsonify }}


def problems():
    if not re.fullmatch(r"[a-z][a-z0-9_]*", FAMILY) or keyword.iskeyword(FAMILY) or FAMILY.endswith("_"):
        yield (f"family {FAMILY!r} is not a valid family name: use a lowercase Python identifier that starts with a "
               "letter (letters, digits, underscores), e.g. 'toy' or 'my_dit'; it names the entry point, the "
               "package (diffcore_<family>) and the distribution (diffcore-<family>)")
        return  # the other names derive from the family: their errors would only repeat this one
    if FAMILY == "diffcore":
        yield "family 'diffcore' is taken by diffcore's built-in plugin; choose another name"
    names = [n.strip() for n in PIPELINES.split(",")]
    if not any(names):
        yield "pipeline_class_names is empty: give the Diffusers pipeline class name(s), e.g. 'ToyPipeline'"
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or not name.endswith("Pipeline") or name == "Pipeline":
            yield (f"pipeline class name {name!r} is not a Python identifier ending with 'Pipeline' (it must equal "
                   "the _class_name in the checkpoints' model_index.json, e.g. 'ToyPipeline'; separate several "
                   "with commas)")
    dupes = sorted({n for n in names if names.count(n) > 1 and n})
    if dupes:
        yield f"pipeline class name(s) {', '.join(dupes)} given twice"
    if not PACKAGE.isidentifier() or keyword.iskeyword(PACKAGE):
        yield f"package_name {PACKAGE!r} is not a Python identifier"
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", DISTRIBUTION):
        yield f"distribution_name {DISTRIBUTION!r} is not a valid distribution name (letters, digits, '.', '_', '-')"
    if not PREFIX.isidentifier() or not PREFIX[:1].isupper():
        yield f"class_prefix {PREFIX!r} must be a Python identifier starting with an uppercase letter"
    if not re.fullmatch(r"diffcore\s*[<>=!~].*", REQUIREMENT):
        yield f"diffcore_requirement {REQUIREMENT!r} must be a version range of diffcore, e.g. 'diffcore>=0.1,<0.2'"


def warnings():
    try:  # cheap (no torch); absent when cookiecutter runs outside diffcore's environment
        from diffcore.plugins import get_plugin_manager

        registry = get_plugin_manager().registry
    except ImportError:
        return
    served = set(registry.names("pipelines"))
    for name in (n.strip() for n in PIPELINES.split(",")):
        if name in served:
            origin = registry.origin("pipelines", name)
            yield (f"{name} is served by the installed {origin.distribution or origin.plugin}; diffcore refuses two "
                   "plugins registering the same pipeline, so do not install both")


errors = list(problems())
if errors:
    for error in errors:
        print(f"ERROR: {error}", file=sys.stderr)
    sys.exit(1)
for warning in warnings():
    print(f"WARNING: {warning}", file=sys.stderr)
