"""The per-step guidance policy (PipelineConfig.guidance_active): rows that stop needing CFG stop costing an
unconditional call, and a batch whose rows disagree still gives each row its solo result. And guidance with more
than two predictions (``guidance_branches`` / ``combine_predictions``): an extra branch costs one call per step,
its combination reaches the output, and rows of a batch that disagree get their solo results.

The toy config's policy is "CFG only in the first ``cfg_steps`` steps" (a per-request sampling parameter); its
extra branch is the prompt's features zeroed, weighted by ``zero_prompt_scale``.
"""
from __future__ import annotations

import numpy as np
import pytest

STEPS = 3
KW = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=4.0, output_type="np")


class CallLog:
    """Batch size of every transformer call."""

    def __init__(self, model):
        self.sizes = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.sizes.append(int(kwargs["hidden_states"].shape[0]))

    def close(self):
        self.handle.remove()


@pytest.fixture
def calls(toy_gen):
    log = CallLog(toy_gen.pipeline.components["transformer"])
    yield log
    log.close()


@pytest.fixture
def select_rows(toy_gen):
    """Restores the shared generator's config switch after a test flips it."""
    config = toy_gen.pipeline.config
    yield config
    config.select_rows = True


def test_cfg_in_first_steps_only_skips_the_unconditional_calls(toy_gen, calls):
    full = toy_gen.generate(**KW, seed=1).output
    assert calls.sizes == [1] * (2 * STEPS)  # cond + uncond at every step
    calls.sizes.clear()
    first = toy_gen.generate(**KW, seed=1, cfg_steps=1).output
    assert calls.sizes == [1, 1, 1, 1]  # cond + uncond at step 0, cond only at steps 1 and 2
    calls.sizes.clear()
    none = toy_gen.generate(**KW, seed=1, cfg_steps=0).output
    assert calls.sizes == [1] * STEPS
    plain = toy_gen.generate(**{**KW, "guidance_scale": 1.0}, seed=1).output  # no CFG at all
    np.testing.assert_array_equal(none, plain)  # guidance never active == no guidance
    assert np.abs(first - full).max() > 1e-3 and np.abs(first - none).max() > 1e-3


@pytest.mark.parametrize("narrow", [True, False], ids=["narrowed-call", "whole-batch-call"])
def test_rows_that_disagree_get_their_solo_results(toy_gen, calls, select_rows, narrow):
    select_rows.select_rows = narrow
    rows = [dict(KW, seed=3, cfg_steps=1), dict(KW, prompt="a blue square", seed=4, guidance_scale=6.0),
            dict(KW, seed=5, cfg_steps=2)]
    solo = [toy_gen.generate(**r).output for r in rows]
    calls.sizes.clear()
    batch = [res.output for res in toy_gen.generate_batch(rows)]
    for alone, together in zip(solo, batch):
        np.testing.assert_allclose(together, alone, atol=1e-5)
    if narrow:  # step 0: 3 rows guided; step 1: rows 2 and 3; step 2: row 2 only
        assert calls.sizes == [3, 3, 3, 2, 3, 1]
    else:
        assert calls.sizes == [3, 3, 3, 3, 3, 3]


def test_an_extra_guidance_branch_costs_one_call_and_is_combined(toy_gen, calls):
    plain = toy_gen.generate(**KW, seed=1).output
    calls.sizes.clear()
    extra = toy_gen.generate(**KW, seed=1, zero_prompt_scale=2.0).output
    assert calls.sizes == [1] * (3 * STEPS)  # cond, uncond, zero_prompt at every step
    assert np.abs(extra - plain).max() > 1e-3
    calls.sizes.clear()
    rows = [dict(KW, seed=3, zero_prompt_scale=1.5), dict(KW, prompt="a blue square", seed=4),
            dict(KW, seed=5, zero_prompt_scale=0.5, cfg_steps=1)]
    solo = [toy_gen.generate(**r).output for r in rows]
    batch = [res.output for res in toy_gen.generate_batch(rows)]
    for alone, together in zip(solo, batch):  # row 2 (scale 0) gets an exact zero term from the shared call
        np.testing.assert_allclose(together, alone, atol=1e-5)
