"""The demo model follows its prompt, measured on fresh captions and seeds.

What is measured (``diffcore_demo.shapes.classify``, deterministic, no model involved):
- background colour: the palette colour nearest (RGB distance) to the per-channel median of the
  2-pixel image border;
- shape colour: the most frequent nearest-palette colour among all pixels not assigned to the
  background colour;
- shape: the fill ratio (pixel count / bounding-box area) of the largest 4-connected component of
  that colour, nearest of circle pi/4 ~ 0.785 and square 1.0.
The classifier itself is first checked on ground-truth renders of the same grammar.
48 captions are drawn from the caption grammar ("a {colour} {circle|square} on a {colour} background")
with a seed the training never used, and generated in one batch from a fresh noise seed with the
model's defaults (20 steps, true CFG 2.5 against the empty caption).
Thresholds (issue 7): shape colour and background colour right in >= 90% of the images, circle vs
square >= 80%.
"""
from __future__ import annotations

import numpy as np
import pytest

from diffcore import DiffGenerator
from diffcore_demo.shapes import classify, random_scene, render

N = 48


def test_classifier_on_ground_truth_renders():
    rng = np.random.default_rng(2024)
    scenes = [random_scene(rng) for _ in range(60)]
    results = [classify(render(s, rng)) for s in scenes]
    assert all(r["colour"] == s.colour and r["background"] == s.background for r, s in zip(results, scenes))
    assert np.mean([r["shape"] == s.shape for r, s in zip(results, scenes)]) >= 0.95


@pytest.fixture(scope="module")
def measured():
    gen = DiffGenerator.from_pretrained("demo", progress=False)
    rng = np.random.default_rng(777_001)  # training drew scenes from seed 0
    scenes = [random_scene(rng) for _ in range(N)]
    images = gen.generate(prompt=[s.caption for s in scenes], seed=424_242, output_type="np").output
    return scenes, [classify(img) for img in images]


def _rate(measured, key, truth):
    scenes, results = measured
    return np.mean([r[key] == getattr(s, truth) for s, r in zip(scenes, results)])


def test_shape_colour_follows_prompt(measured):
    rate = _rate(measured, "colour", "colour")
    assert rate >= 0.9, f"shape colour right in {rate:.0%} of {N} images"


def test_background_colour_follows_prompt(measured):
    rate = _rate(measured, "background", "background")
    assert rate >= 0.9, f"background colour right in {rate:.0%} of {N} images"


def test_shape_follows_prompt(measured):
    rate = _rate(measured, "shape", "shape")
    assert rate >= 0.8, f"shape right in {rate:.0%} of {N} images"
