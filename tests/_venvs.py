"""Fresh virtual environments for the install tests (test_template.py, test_wheels.py), offline.

``python -m venv --system-site-packages`` exposes the *base* interpreter's packages, not those of the
environment running the tests (torch, transformers, pip, setuptools live there). So a new venv gets a
``.pth`` line pointing at an overlay folder of symlinks to this environment's site-packages entries,
minus diffcore's own distributions and editable-install hooks: third-party packages are shared, while
diffcore and its plugins exist in the venv only as the test installs them (wheels, or ``pip -e``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ours(name: str) -> bool:
    lowered = name.lower().replace("-", "_")
    return lowered.startswith(("diffcore", "__editable__", "__pycache__")) or name.endswith(".pth")


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DIFFCORE_", "VIRTUAL_ENV"))}
    env.update(VIRTUAL_ENV=str(root), PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


class Venv:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.python = self.root / "bin" / "python"
        self.site = self.root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"

    @classmethod
    def create(cls, root: Path) -> "Venv":
        root = Path(root)
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(root)
        env = cls(root)
        overlay = root / "shared-site-packages"
        overlay.mkdir()
        paths = sysconfig.get_paths()
        for site in dict.fromkeys([paths["purelib"], paths["platlib"]]):
            for entry in sorted(Path(site).iterdir()):
                link = overlay / entry.name
                if not _ours(entry.name) and not link.exists():
                    link.symlink_to(entry)
        (env.site / "_shared_site_packages.pth").write_text(f"{overlay}\n")
        return env

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def run(self, *args, cwd=None, timeout: int = 300, check: bool = True, env: dict | None = None):
        proc = subprocess.run([str(a) for a in args], cwd=cwd or self.root, env=_env(self.root) | (env or {}),
                              capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                                 f"\n--- stderr\n{proc.stderr[-4000:]}")
        return proc

    def pip_install(self, *args) -> subprocess.CompletedProcess:
        return self.run(self.python, "-m", "pip", "install", "--no-index", "--no-deps", *args, timeout=600)

    def python_code(self, code: str, **kwargs) -> str:
        return self.run(self.python, "-c", code, **kwargs).stdout


def _ignore(root: Path):
    top = {"build", "dist", "tests", "training", ".venv"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
        return skip | (top & set(names) if Path(folder) == root else set())

    return ignore


def build_wheel(project: Path, out: Path, work: Path) -> Path:
    """``pip wheel`` (offline, no isolation) of a copy of ``project``, so no build files land in the repo."""
    project = Path(project).resolve()
    src = Path(work) / project.name
    if project == ROOT:  # the core: only what its wheel is made of
        src.mkdir(parents=True)
        shutil.copytree(ROOT / "diffcore", src / "diffcore", ignore=_ignore(ROOT / "diffcore"))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (ROOT / name).is_file():
                shutil.copy2(ROOT / name, src / name)
    else:
        shutil.copytree(project, src, ignore=_ignore(project))
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
           str(src)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "PIP_"))}
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"building a wheel of {project} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (wheel,) = set(out.glob("*.whl")) - before
    return wheel

