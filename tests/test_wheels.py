"""Installable as users install: wheels of diffcore and every plugin, in a fresh venv, not editable."""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ALL_PLUGIN_DIRS = sorted(p for p in (ROOT / "plugins").iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
PLUGIN_DIRS = [p for p in ALL_PLUGIN_DIRS if (p / "pyproject.toml").is_file()]


def _venvs():
    name = "_diffcore_test_venvs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_venvs.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _project(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())["project"]


def _package_dir(folder: Path) -> Path:
    (module,) = {v.split(":")[0].split(".")[0] for v in _project(folder)["entry-points"]["diffcore"].values()}
    return folder / module


def _write_incompatible_plugin(folder: Path) -> Path:
    """A plugin built for an older core: its metadata requires diffcore<0.1. Importing it would fail loudly,
    so the test also proves the registry refuses it from its metadata, before importing anything."""
    (folder / "diffcore_oldcore").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "diffcore-oldcore"
        version = "0.0.3"
        dependencies = ["diffcore<0.1"]

        [project.entry-points.diffcore]
        oldcore = "diffcore_oldcore.plugin"
        """))
    (folder / "diffcore_oldcore" / "__init__.py").write_text("")
    (folder / "diffcore_oldcore" / "plugin.py").write_text('raise RuntimeError("imported despite its diffcore<0.1")\n')
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    venvs = _venvs()
    work = tmp_path_factory.mktemp("wheels")
    wheels = [venvs.build_wheel(ROOT, work / "wheels", work / "src")]
    wheels += [venvs.build_wheel(p, work / "wheels", work / "src") for p in PLUGIN_DIRS]
    wheels.append(venvs.build_wheel(_write_incompatible_plugin(work / "diffcore-oldcore"), work / "wheels", work / "src"))
    env = venvs.Venv.create(work / "venv")
    env.pip_install(*wheels)
    plugins = json.loads(env.run(env.bin("diffcore"), "plugins", "--json").stdout)
    return env, wheels, plugins


def test_every_plugin_folder_is_a_package_with_a_core_range():
    from packaging.requirements import Requirement
    from packaging.version import Version

    import diffcore

    for folder in ALL_PLUGIN_DIRS:
        assert (folder / "pyproject.toml").is_file(), f"{folder} has no pyproject.toml"
        project = _project(folder)
        assert project["name"] == folder.name
        assert project["entry-points"]["diffcore"], f"{folder.name} declares no diffcore entry point"
        (core,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "diffcore"]
        assert core.specifier and Version(diffcore.__version__) in core.specifier, f"{folder.name}: {core}"
        assert any(s.operator in ("<", "<=", "~=", "==") for s in core.specifier), f"{folder.name}: no upper bound"


def test_installed_from_wheels_not_the_repo(installed):
    env, wheels, _ = installed
    assert {w.name.split("-")[0] for w in wheels} >= {"diffcore", *(p.name.replace("-", "_") for p in PLUGIN_DIRS)}
    packages = ["diffcore", *(_package_dir(p).name for p in PLUGIN_DIRS)]
    out = env.python_code(f"import importlib; [print(importlib.import_module(m).__file__) for m in {packages!r}]")
    for module, path in zip(packages, out.split()):
        assert Path(path).is_relative_to(env.site), f"{module} imported from {path}, not the venv's site-packages"
    assert not list(env.site.glob("__editable__*")), "an editable install slipped in"


def test_each_plugin_is_discovered_with_its_package_data(installed):
    env, _, data = installed
    plugins = {p["name"]: p for p in data["plugins"]}
    for folder in PLUGIN_DIRS:
        project = _project(folder)
        for entry_name in project["entry-points"]["diffcore"]:
            assert entry_name in plugins, f"{folder.name}: entry point {entry_name!r} not discovered; {data}"
            assert plugins[entry_name]["distribution"] == project["name"]
            assert plugins[entry_name]["version"] == project["version"]
        source = _package_dir(folder)
        shipped = {p.relative_to(source).as_posix() for p in source.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}
        target = env.site / source.name
        missing = sorted(f for f in shipped if not (target / f).is_file())
        assert not missing, f"{folder.name}'s wheel lacks package files (declare them as package data): {missing}"
    assert "flux" in plugins and {"FluxPipeline", "FluxKontextPipeline"} <= set(plugins["flux"]["pipelines"])


def test_plugin_for_an_incompatible_core_is_refused_clearly(installed):
    env, _, data = installed
    assert "oldcore" not in {p["name"] for p in data["plugins"]}
    errors = {e["plugin"]: e["error"] for e in data["errors"]}
    assert set(errors) == {"oldcore"}, data["errors"]
    message = errors["oldcore"]
    assert "diffcore-oldcore 0.0.3 requires diffcore<0.1" in message and "0.1.0 is installed" in message, message
    assert "imported despite" not in message
    # the CLI's plain listing shows it too, and strict mode turns it into a failure
    proc = env.run(env.bin("diffcore"), "plugins")
    assert "ERROR oldcore" in proc.stdout and "requires diffcore<0.1" in proc.stdout
    strict = env.run(env.bin("diffcore"), "plugins", check=False, env={"DIFFCORE_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0 and "requires diffcore<0.1" in strict.stderr


def test_generate_runs_a_tiny_model_in_the_venv(installed, tmp_path):
    env, _, _ = installed
    from diffcore_flux.testing import write_tiny_flux

    model = write_tiny_flux(tmp_path / "tiny-flux")
    out = tmp_path / "out.png"
    proc = env.run(env.bin("diffcore"), "generate", "--model", model, "--prompt", "a red circle", "--height", "32",
                   "--width", "48", "--steps", "2", "--dtype", "float32", "--quiet", "--output", out, cwd=tmp_path)
    assert "wrote" in proc.stdout
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (48, 32)


def test_generate_runs_a_tiny_zimage_in_the_venv(installed, tmp_path):
    """diffcore-zimage from its wheel (built from plugins/diffcore-zimage): a tiny Z-Image-Turbo folder generates."""
    env, _, _ = installed
    from diffcore_zimage.testing import write_tiny_zimage

    model = write_tiny_zimage(tmp_path / "tiny-z-image-turbo")
    out = tmp_path / "zimage.png"
    proc = env.run(env.bin("diffcore"), "generate", "--model", model, "--prompt", "a red fox", "--height", "32",
                   "--width", "48", "--steps", "2", "--dtype", "float32", "--quiet", "--output", out, cwd=tmp_path)
    assert "wrote" in proc.stdout
    site = env.python_code("import diffcore_zimage; print(diffcore_zimage.__file__)")
    assert Path(site.strip()).is_relative_to(env.site)
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (48, 32)


def test_zimage_installs_from_its_folder_into_a_fresh_venv(installed, tmp_path):
    """``pip install plugins/diffcore-zimage`` (not editable) next to the core's wheel in a venv of its own:
    discovered from site-packages with every package file, and a tiny Z-Image-Turbo folder generates. pip runs
    on a copy of the folder (as a fresh checkout), since building writes egg-info and build/ into it."""
    import shutil

    venvs = _venvs()
    core_wheel = next(w for w in installed[1] if w.name.startswith("diffcore-"))
    folder = ROOT / "plugins" / "diffcore-zimage"
    checkout = tmp_path / "checkout" / folder.name
    shutil.copytree(folder, checkout, ignore=venvs._ignore(folder))
    env = venvs.Venv.create(tmp_path / "venv")
    env.pip_install(core_wheel)
    env.pip_install("--no-build-isolation", checkout)
    plugins = {p["name"]: p for p in json.loads(env.run(env.bin("diffcore"), "plugins", "--json").stdout)["plugins"]}
    assert set(plugins) == {"diffcore", "zimage"} and plugins["zimage"]["distribution"] == "diffcore-zimage", plugins
    assert {"ZImagePipeline", "ZImageImg2ImgPipeline"} <= set(plugins["zimage"]["pipelines"])
    package = Path(env.python_code("import diffcore_zimage; print(diffcore_zimage.__file__)").strip()).parent
    assert package.is_relative_to(env.site) and not list(env.site.glob("__editable__*"))
    shipped = {p.relative_to(folder / "diffcore_zimage").as_posix() for p in (folder / "diffcore_zimage").rglob("*.py")}
    assert shipped <= {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    from diffcore_zimage.testing import write_tiny_zimage

    model = write_tiny_zimage(tmp_path / "tiny-z-image-turbo")
    out = tmp_path / "zimage.png"
    proc = env.run(env.bin("diffcore"), "generate", "--model", model, "--prompt", "a red fox", "--height", "32",
                   "--width", "32", "--steps", "2", "--dtype", "float32", "--quiet", "--output", out, cwd=tmp_path)
    assert "wrote" in proc.stdout and out.stat().st_size > 0


@pytest.mark.skipif(not (ROOT / "plugins/diffcore-demo/diffcore_demo/model/model_index.json").is_file(),
                    reason="the demo plugin ships no model yet")
def test_generate_runs_the_bundled_demo_model(installed, tmp_path):
    env, _, _ = installed
    out = tmp_path / "demo.png"
    env.run(env.bin("diffcore"), "generate", "--prompt", "a red circle on a blue background", "--quiet", "--output", out,
            cwd=tmp_path)
    assert out.is_file() and out.stat().st_size > 0
