"""Discovery: the installed distribution's entry point registers the plugin, cheaply and without errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

PIPELINES = [
    "ZImagePipeline",
    "ZImageImg2ImgPipeline"
]


def _diffcore_cli() -> list[str]:
    script = shutil.which("diffcore", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "diffcore.cli"]


def test_discovered_through_entry_point():
    """`diffcore plugins --json` (a fresh process, real entry points) lists the plugin and no load error."""
    proc = subprocess.run([*_diffcore_cli(), "plugins", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert "zimage" in plugins, f"not discovered; plugins: {sorted(plugins)}, errors: {data['errors']}"
    entry = plugins["zimage"]
    assert entry["distribution"] == "diffcore-zimage"
    assert sorted(entry["pipelines"]) == sorted(PIPELINES)
    assert not [e for e in data["errors"] if e["plugin"] == "zimage"], data["errors"]


def test_entry_point_module_does_not_import_torch():
    code = "import sys, diffcore_zimage.plugin; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_registry_resolves_every_record(isolated_plugin_manager):
    import diffcore_zimage.plugin
    from diffcore.testing.conformance import check_dataflow
    from diffcore_zimage.configs import ZImageConfig
    from diffcore_zimage.transformer import ZImageTransformer2DModel

    registry = isolated_plugin_manager(diffcore_zimage.plugin).registry
    assert registry.get("modules", "ZImageTransformer2DModel") is ZImageTransformer2DModel
    for name in PIPELINES:
        pipeline_cls = registry.get("pipelines", name)
        assert pipeline_cls.pipeline_name == name
        check_dataflow(pipeline_cls, config=ZImageConfig())
