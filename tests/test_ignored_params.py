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
