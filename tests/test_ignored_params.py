"""One core rule for ignored parameters: a parameter the caller set that the model never read is a warning,
whatever the family (issue 30 item 6)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

SMALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=3, output_type="np")


def _ignored(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]


def test_a_parameter_no_stage_reads_is_reported(toy_gen, caplog):
    """The toy model has no true CFG (it guides with guidance_scale): true_cfg_scale is never read."""
    base = toy_gen.generate(**SMALL).output
    with caplog.at_level(logging.WARNING):
        out = toy_gen.generate(**SMALL, true_cfg_scale=4.0).output
    messages = _ignored(caplog)
    assert messages == ["true_cfg_scale is ignored: this model does not use it (it was set, but nothing read it)"]
    np.testing.assert_array_equal(out, base)  # and indeed nothing changed


def test_parameters_the_model_reads_are_not_reported(toy_gen, caplog):
    with caplog.at_level(logging.WARNING):
        toy_gen.generate(**SMALL, guidance_scale=4.0, negative_prompt="blurry")
    assert _ignored(caplog) == []


def test_block_callback_on_a_model_without_blocks_is_reported(toy_gen, caplog):
    with caplog.at_level(logging.WARNING):
        toy_gen.generate(**SMALL, block_callback=lambda *a: None)
    assert any("block_callback is ignored" in m for m in _ignored(caplog))


def test_the_servers_check_is_quiet_and_given_is_no_parameter(toy_gen, caplog):
    with caplog.at_level(logging.WARNING):
        toy_gen.check({**SMALL, "true_cfg_scale": 4.0})
    assert _ignored(caplog) == []
    with pytest.raises(Exception, match="unknown parameter"):
        toy_gen.generate(**SMALL, _given=("x",))
    assert "_given" not in toy_gen.sampling_params_cls.parameter_names()


def test_the_rule_applies_to_a_served_request_too(toy_gen, caplog):
    from diffcore.engine.batching import run_batch

    with caplog.at_level(logging.WARNING):
        (result,) = run_batch(toy_gen.pipeline, [toy_gen.new_request(toy_gen.params_from({**SMALL, "true_cfg_scale": 4.0}))])
    assert not isinstance(result, Exception)
    assert any(m.startswith("true_cfg_scale is ignored") for m in _ignored(caplog))


def test_the_rule_applies_to_each_request_of_a_merged_batch(toy_gen, caplog):
    """Rows merged into one batch (one transformer call per step for all) still get the rule, each for what it
    was given: the request that set true_cfg_scale is warned once, the one that set guidance_scale (read by the
    merged stages through its row's parameters) is not."""
    from diffcore.engine.batching import run_batch

    plain = toy_gen.request({**SMALL})
    ignored_one = toy_gen.request({**SMALL, "seed": 4, "true_cfg_scale": 4.0})
    guided = toy_gen.request({**SMALL, "seed": 5, "guidance_scale": 3.0})
    calls = []
    hook = toy_gen.components["transformer"].register_forward_pre_hook(lambda m, a, kw: calls.append(1),
                                                                      with_kwargs=True)
    try:
        with caplog.at_level(logging.WARNING):
            results = run_batch(toy_gen.pipeline, [plain, ignored_one, guided])
    finally:
        hook.remove()
    assert not any(isinstance(r, Exception) for r in results)
    assert len(calls) < 3 * SMALL["num_inference_steps"]  # rows did share transformer calls
    assert _ignored(caplog) == ["true_cfg_scale is ignored: this model does not use it (it was set, but nothing read it)"]
