"""A plugin's check that its model previews (``generate(on_preview=...)``, the server's streamed partial images)."""
from __future__ import annotations

import numpy as np


def assert_pooled_previews(gen, side: int = 8, **kwargs) -> list:
    """``gen.generate(**kwargs)`` with two previews, decoded on a pooled latent grid (``PREVIEW_SIDE`` = ``side``
    pixels, so a tiny request pools): the family's unpack / pack / decode hooks take the smaller grid (no fall
    back to a full-size decode), each preview has the result's shape and is finite, and the result is unchanged.
    Returns the previews."""
    from diffcore import previews

    height, width = kwargs["height"], kwargs["width"]
    old, previews.PREVIEW_SIDE = previews.PREVIEW_SIDE, side
    try:
        assert previews.pooling_factor(gen.config, height, width) > 1, "choose a size the latent grid can pool"
        got: list = []
        with_previews = gen.generate(**kwargs, on_preview=got.append, partial_images=2, output_type="np")
    finally:
        previews.PREVIEW_SIDE = old
    assert type(gen.config) not in previews._FULL_SIZE_ONLY, "the pooled preview decode failed (see the log)"
    plain = gen.generate(**kwargs, output_type="np")
    assert np.array_equal(with_previews.output, plain.output)
    assert len(got) == 2 and [p.index for p in got] == [0, 1]
    for p in got:
        assert p.output.shape == plain.output.shape and np.isfinite(p.output).all()
    return got
