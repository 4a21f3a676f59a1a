"""The proof-of-equality harness for sequence / CFG parallelism: run cases under torchrun, save outputs.

    torchrun --nproc-per-node N -m diffcore.testing.parallel CASES.json OUT_DIR

``CASES.json`` is a list of ``{"name", "model" (folder), "engine" (EngineArgs, e.g. sp_degree,
cfg_parallel, cache), "generate" (generate() keywords), "image" ([width, height, seed], a list of those
for several input images, or null), optionally "mask" ([width, height]: an inpainting box mask) and
"layouts" (the parallel layouts the case runs under; read by the test)}``.
Every rank writes ``OUT_DIR/<name>.rank<r>.npy`` (its output; with a sound track, frames and waveform
flattened into one array) and ``<name>.rank<r>.json`` (step-cache
stats, seconds), so a test can check every rank returned the same result and compare it with a
one-process run of the same case (``run_case`` without parallel options). Many cases share one
launch: starting processes costs more than the tiny models.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np


def case_image(spec: Optional[list]):
    """A random RGB image from ``[width, height, seed]``; a list of such specs gives a list of images."""
    if spec is None:
        return None
    if isinstance(spec[0], list):
        return [case_image(s) for s in spec]
    from PIL import Image

    width, height, seed = spec
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def run_case(case: dict, **engine_overrides) -> tuple[np.ndarray, dict, Any]:
    """``(output, info, generator)`` of one case; ``engine_overrides`` replace its engine options."""
    from diffcore import DiffGenerator

    engine = {"dtype": "float32", "progress": False, **case.get("engine", {}), **engine_overrides}
    gen = DiffGenerator.from_pretrained(case["model"], **engine)
    image = case_image(case.get("image"))
    kwargs = dict(case["generate"], output_type="np")
    if image is not None:
        kwargs["image"] = image
    if case.get("mask"):
        from .images import box_mask

        kwargs["mask"] = box_mask(*case["mask"])
    start = time.perf_counter()
    result = gen.generate(**kwargs)
    info = {"seconds": time.perf_counter() - start, "rank": gen.rank, "cache_stats": result.cache_stats,
            "parallel_stats": dict(gen.pipeline.parallel.stats) if gen.pipeline.parallel is not None else None}
    output = result.output
    if result.audios is not None:  # a sound track is compared too: frames and waveform, flattened side by side
        output = np.concatenate([np.ravel(output), np.ravel(result.audios)])
    return output, info, gen


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cases = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    opened = []  # every pipeline's groups; the first one also created the default group, so it closes last
    for case in cases:
        output, info, gen = run_case(case)
        if gen.pipeline.parallel is not None:
            opened.append(gen.pipeline.parallel)
        rank = info["rank"]
        np.save(out / f"{case['name']}.rank{rank}.npy", output)
        (out / f"{case['name']}.rank{rank}.json").write_text(json.dumps(info))
        del gen
    for groups in reversed(opened):
        groups.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
