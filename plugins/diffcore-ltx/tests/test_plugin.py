"""Discovery: the installed distribution's entry point registers the plugin, cheaply and without errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

PIPELINES = [
    "LTX2Pipeline",
    "LTX2ImageToVideoPipeline",
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
    assert "ltx" in plugins, f"not discovered; plugins: {sorted(plugins)}, errors: {data['errors']}"
    entry = plugins["ltx"]
    assert entry["distribution"] == "diffcore-ltx"
    assert sorted(entry["pipelines"]) == sorted(PIPELINES)
    assert not [e for e in data["errors"] if e["plugin"] == "ltx"], data["errors"]


def test_entry_point_module_does_not_import_torch():
    code = "import sys, diffcore_ltx.plugin; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_registry_resolves_every_record(isolated_plugin_manager):
    import diffcore_ltx.plugin
    from diffcore.testing.conformance import check_dataflow
    from diffcore_ltx.configs import LTX2Config
    from diffcore_ltx.transformer import LTX2VideoTransformer3DModel
    from diffcore_ltx.vocoder import LTX2Vocoder

    registry = isolated_plugin_manager(diffcore_ltx.plugin).registry
    assert registry.get("modules", "LTX2VideoTransformer3DModel") is LTX2VideoTransformer3DModel
    assert registry.get("modules", "LTX2Vocoder") is LTX2Vocoder
    for name in PIPELINES:
        pipeline_cls = registry.get("pipelines", name)
        assert pipeline_cls.pipeline_name == name
        check_dataflow(pipeline_cls, config=LTX2Config())


def test_aliases_name_the_dev_and_distilled_checkpoints(isolated_plugin_manager):
    import diffcore_ltx.plugin

    registry = isolated_plugin_manager(diffcore_ltx.plugin).registry
    dev, distilled = registry.config_for_alias("ltx-2-dev"), registry.config_for_alias("ltx-2-distilled")
    assert registry.config_for_alias("ltx-2") is dev and dev.source == "Lightricks/LTX-2"
    assert dev.sampling_params.endswith(":LTX2SamplingParams")
    assert distilled.sampling_params.endswith(":LTX2DistilledSamplingParams")
    from diffcore.records import resolve_ref
    from diffcore_ltx.configs import DISTILLED_SIGMA_VALUES

    params = resolve_ref(distilled.sampling_params).from_user(prompt="a cat")
    assert params.sigmas == list(DISTILLED_SIGMA_VALUES) and params.num_inference_steps == 8
    assert (params.guidance_scale, params.stg_scale, params.modality_scale) == (1.0, 0.0, 1.0)
