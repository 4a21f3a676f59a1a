"""Decoding a 33-frame video streams one latent frame at a time instead of holding every frame's
decoder activations: checked structurally, and by the peak RSS (VmHWM) of whole runs in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from wan_testlib import ours

_RUN = textwrap.dedent("""
    import os, sys
    from diffcore import DiffGenerator
    folder, frames, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    out = gen.generate(prompt="a cat", num_frames=frames, height=size, width=size, num_inference_steps=1,
                       guidance_scale=1.0, output_type="np").output
    assert out.shape == (1, frames, size, size, 3), out.shape
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print(hwm // 1024)
""")


def _peak_rss_mb(folder, frames: int, size: int) -> int:
    # A fixed mmap threshold stops glibc from keeping freed large blocks on its heap, so VmHWM follows
    # the live tensors instead of allocator history (without it, repeated runs vary by +-100 MB).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _RUN, str(folder), str(frames), str(size)], env=env, check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_decoder_runs_one_latent_frame_at_a_time(wan_folders):
    gen = ours(wan_folders["t2v21"])
    seen = []
    handle = gen.components["vae"].decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    try:
        out = gen.generate(prompt="a cat", num_frames=33, height=32, width=32, num_inference_steps=1,
                           guidance_scale=1.0, output_type="np").output
    finally:
        handle.remove()
    assert out.shape == (1, 33, 32, 32, 3)
    assert seen == [1] * 9  # 33 frames = 9 latent frames, each decoded alone


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for VmHWM")
def test_peak_rss_does_not_grow_with_all_frames_activations(wan_folders):
    """At 96x96 a decoder that held all 33 frames' activations (its conv3d unfold buffers alone: ~260 MB)
    would need far more than for 9 frames; streaming adds only the 24 extra output frames (~2.5 MB per copy)."""
    folder = wan_folders["t2v21"]
    peak9, peak33 = _peak_rss_mb(folder, 9, 96), _peak_rss_mb(folder, 33, 96)
    print(f"peak RSS (VmHWM) of a whole tiny run at 96x96: 9 frames {peak9} MB, 33 frames {peak33} MB")
    assert peak33 < peak9 + 32, (peak9, peak33)
