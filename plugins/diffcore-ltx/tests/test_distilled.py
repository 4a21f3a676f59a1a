"""LTX-2 distilled: a folder whose scheduler has no dynamic shifting samples with the 8 distilled sigmas and no
guidance (one transformer call per step), as diffusers' documented distilled call does."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffcore_ltx.configs import DISTILLED_SIGMA_VALUES

from ltx_testlib import SMALL, run_diffusers
from test_pipeline import PROMPT, assert_parity


@pytest.fixture(scope="module")
def distilled_checkpoint(t2v_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ltx") / "distilled"
    shutil.copytree(t2v_checkpoint, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_dynamic_shifting": False, "shift_terminal": None}))
    return folder


def test_distilled_defaults_match_diffusers(load, distilled_checkpoint):
    gen = load(distilled_checkpoint)
    assert gen.sampling_params_cls.__name__ == "LTX2DistilledSamplingParams"  # picked by the scheduler config
    small = {k: v for k, v in SMALL.items() if k != "num_inference_steps"}
    before = gen.pipeline.denoiser.calls
    result = gen.generate(prompt=PROMPT, seed=0, output_type="np", **small)
    assert gen.pipeline.denoiser.calls - before == 8  # 8 steps, one call each
    frames, audio = run_diffusers(distilled_checkpoint, prompt=PROMPT, num_inference_steps=8,
                                  sigmas=list(DISTILLED_SIGMA_VALUES), guidance_scale=1.0, stg_scale=0.0,
                                  modality_scale=1.0, guidance_rescale=0.0, audio_guidance_scale=1.0,
                                  audio_stg_scale=0.0, audio_modality_scale=1.0, audio_guidance_rescale=0.0)
    assert_parity(frames, audio, result)
    assert np.isfinite(result.output).all()
