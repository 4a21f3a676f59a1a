"""The cookiecutter template renders a plugin that installs into a fresh venv, is discovered, and passes its tests."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "templates" / "diffcore-plugin"

EXPECTED_FILES = {
    "pyproject.toml", "README.md",
    "diffcore_toy/__init__.py", "diffcore_toy/plugin.py", "diffcore_toy/configs.py", "diffcore_toy/pipelines.py",
    "diffcore_toy/transformer.py", "diffcore_toy/testing.py",
    "tests/conftest.py", "tests/test_plugin.py", "tests/test_pipeline.py", "tests/test_transformer.py",
}


def _venvs():
    name = "_diffcore_test_venvs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_venvs.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _render(out: Path, **context) -> Path:
    from cookiecutter.main import cookiecutter

    return Path(cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(out), extra_context=context or None))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    return _render(tmp_path_factory.mktemp("render"))


def test_renders_the_expected_files(rendered):
    assert rendered.name == "diffcore-toy"
    files = {p.relative_to(rendered).as_posix() for p in rendered.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES
    for path in rendered.rglob("*.py"):
        text = path.read_text()
        compile(text, str(path), "exec")
        assert "{{" not in text and "{%" not in text, f"unrendered Jinja in {path}"
    project = tomllib.loads((rendered / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["diffcore"] == {"toy": "diffcore_toy.plugin"}
    assert project["dependencies"] == ["diffcore>=0.1,<0.2"]
    plugin = (rendered / "diffcore_toy" / "plugin.py").read_text()
    assert "import torch" not in plugin and "@hookimpl" in plugin


@pytest.mark.parametrize("context,message", [
    ({"family": "9lives"}, "family '9lives' is not a valid family name"),
    ({"family": "My-Model"}, "family 'My-Model' is not a valid family name"),
    ({"family": "class"}, "family 'class' is not a valid family name"),
    ({"family": "diffcore"}, "family 'diffcore' is taken"),
    ({"pipeline_class_names": "ToyModel"}, "pipeline class name 'ToyModel' is not a Python identifier ending with 'Pipeline'"),
    ({"pipeline_class_names": "ToyPipeline, ToyPipeline"}, "given twice"),
])
def test_invalid_names_are_rejected_before_rendering(tmp_path, capfd, context, message):
    from cookiecutter.exceptions import FailedHookException

    with pytest.raises(FailedHookException):
        _render(tmp_path, **context)
    assert message in capfd.readouterr().err
    assert not any(tmp_path.iterdir()), "files were written for an invalid name"


def test_several_pipeline_classes(tmp_path, isolated_plugin_manager):
    """Each pipeline class given renders, registers and passes the dataflow proof."""
    from diffcore.testing.conformance import check_dataflow

    out = _render(tmp_path, family="multi_dit", pipeline_class_names="MultiDitPipeline, MultiDitEditPipeline")
    sys.path.insert(0, str(out))
    try:
        plugin = importlib.import_module("diffcore_multi_dit.plugin")
        configs = importlib.import_module("diffcore_multi_dit.configs")
        registry = isolated_plugin_manager(plugin).registry
        assert registry.names("pipelines") == ["MultiDitEditPipeline", "MultiDitPipeline"]
        for name in registry.names("pipelines"):
            check_dataflow(registry.get("pipelines", name), config=configs.MultiDitConfig())
        assert sorted(e.record.name for e in registry.tables["configs"].values()) == ["multi-dit", "multi-dit-edit"]
    finally:
        sys.path.remove(str(out))
        for mod in [m for m in sys.modules if m.startswith("diffcore_multi_dit")]:
            del sys.modules[mod]


def test_rendered_plugin_installs_is_discovered_and_passes_its_tests(rendered, tmp_path_factory):
    venvs = _venvs()
    work = tmp_path_factory.mktemp("template-venv")
    env = venvs.Venv.create(work / "venv")
    env.pip_install(venvs.build_wheel(ROOT, work / "wheels", work / "src"))
    env.pip_install("--no-build-isolation", "-e", rendered)

    where = env.python_code("import diffcore, diffcore_toy; print(diffcore.__file__); print(diffcore_toy.__file__)")
    core_file, toy_file = where.split()
    assert Path(core_file).is_relative_to(env.site), f"diffcore imported from {core_file}, not the venv"
    assert Path(toy_file).is_relative_to(rendered)

    data = json.loads(env.run(env.bin("diffcore"), "plugins", "--json").stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert set(plugins) == {"diffcore", "toy"}, f"unexpected plugins in a fresh venv: {sorted(plugins)}"
    assert plugins["toy"]["distribution"] == "diffcore-toy" and plugins["toy"]["pipelines"] == ["ToyPipeline"]
    assert data["errors"] == []

    proc = env.run(env.python, "-m", "pytest", "-q", cwd=rendered, check=False, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 15 and "skipped" not in summary and "failed" not in summary, summary
