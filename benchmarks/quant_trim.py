"""What ``malloc_trim`` costs in a quantized load: FLUX-medium (bf16-stored) int8, trimming after every
layer versus once per ``trim_bytes`` quantized.

    .venv/bin/python -m benchmarks.quant_trim          # results/quant-trim-flux.json

Each load runs in a fresh process (its own peak RSS), after an unquantized load there that brings in
the imports and plugins; ``clear_refs`` then restarts VmHWM, so the peak is the int8 load's own.
Configurations alternate, ``--repeats`` rounds. ``trim_s`` is the time spent inside
``diffcore.memory.trim`` (glibc ``malloc_trim(0)``); memory columns are MB above the RSS before the load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import RESULTS, log, machine  # noqa: E402
from benchmarks.workloads import checkpoint  # noqa: E402

_PROBE = """
import gc, json, sys, time
import diffcore.memory as memory
import diffcore.quantization as q
from diffcore.api import DiffGenerator

spent = [0.0, 0]
def timed():
    t = time.perf_counter()
    memory.trim()
    spent[0] += time.perf_counter() - t
    spent[1] += 1
q.trim = timed
q.TRIM_BYTES = int(sys.argv[1])
q.LayerQuantizer.__init__.__defaults__ = (q.TRIM_BYTES,)

def status():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            d[key] = int(value.split()[0]) / 1024
    return d

g = DiffGenerator.from_pretrained(sys.argv[2])  # imports and plugin discovery, not measured
del g
gc.collect()
memory.trim()
spent[:] = [0.0, 0]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status()["VmRSS"]
g = DiffGenerator.from_pretrained(sys.argv[2], quantization="int8_weight_only")
after = status()
print(json.dumps({"load_s": g.load_time, "trim_s": spent[0], "trims": spent[1], "base_rss_mb": base,
                  "rss_after_load_mb": after["VmRSS"] - base, "load_peak_mb": after["VmHWM"] - base}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trim-mb", default="0,8,16,64,inf", help="comma-separated; 0: after every layer, inf: at the end only")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    folder = checkpoint("flux", "bf16", log=log)
    head = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": os.getloadavg(),
            "checkpoint": "flux-medium bf16-stored", "scheme": "int8_weight_only", "threads": 1}
    rows = []
    for rep in range(args.repeats):
        for mb in args.trim_mb.split(","):
            trim_bytes = 2**62 if mb == "inf" else int(float(mb) * 2**20)
            out = subprocess.run([sys.executable, "-c", _PROBE, str(trim_bytes), str(folder)], capture_output=True,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            row = {"trim_mb": mb, "round": rep, **json.loads(out.stdout.strip().splitlines()[-1])}
            log(f"trim every {mb} MB: load {row['load_s']:.2f} s, {row['trims']} trims {row['trim_s']:.3f} s, "
                f"load peak +{row['load_peak_mb']:.0f} MB")
            rows.append(row)
            (RESULTS / "quant-trim-flux.json").write_text(
                json.dumps({**head, "load_avg_now": os.getloadavg(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
