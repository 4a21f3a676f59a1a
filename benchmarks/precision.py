"""Which precision ``dtype=None`` picks on this CPU, and the measurement behind the rule.

    .venv/bin/python -m benchmarks.precision     # writes results/precision.json, prints one table row

Times a 1024 x 1536 -> 6144 -> 1536 MLP (a DiT feed-forward at 1024 tokens) in fp32 and bf16, through
plain ``F.linear`` and through diffcore's ``Linear`` (oneDNN where fastpaths allow), median of
``--repeat`` interleaved runs, and records the CPU features torch reports and the decision of
``diffcore.precision``. On CPUs with AVX512-BF16 / AMX bf16 should be the faster one; without them
fp32 (NOTES: ~6x on an AVX2 EPYC), which is why ``dtype=None`` picks fp32 there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffcore import fastpaths, precision
    from diffcore.models.linear import Linear, linear

    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(1024, 1536, generator=g)
    up, down = Linear(1536, 6144).requires_grad_(False), Linear(6144, 1536).requires_grad_(False)
    engines = {}
    for dtype in (torch.float32, torch.bfloat16):
        u, d = Linear(1536, 6144).to(dtype).requires_grad_(False), Linear(6144, 1536).to(dtype).requires_grad_(False)
        u.load_state_dict(up.state_dict()), d.load_state_dict(down.state_dict())
        x = x32.to(dtype)
        name = str(dtype).removeprefix("torch.")
        plain = [t.detach().clone() for t in (u.weight, u.bias, d.weight, d.bias)]  # diffcore's layers re-lay theirs out
        engines[f"F.linear {name}"] = lambda x=x, w=plain: F.linear(F.gelu(F.linear(x, w[0], w[1]), approximate="tanh"), w[2], w[3])
        engines[f"diffcore {name}"] = lambda x=x, u=u, d=d: d(linear(x, u, "gelu_tanh"))
    times = {k: [] for k in engines}
    with torch.inference_mode():
        for fn in engines.values():
            fn()  # warm-up (and weight re-layout)
        for _ in range(args.repeat):
            for k, fn in engines.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    fast, why = precision.native_bf16("cpu")
    import os

    out = {"cpu": fastpaths.cpu_features(), "threads": args.threads, "load_avg": os.getloadavg(), "native_bf16": fast, "why": why,
           "dtype_none_picks_for_bf16_models": "bfloat16" if fast else "float32", "median_s": med,
           "bf16_over_fp32": {e: med[f"{e} bfloat16"] / med[f"{e} float32"] for e in ("F.linear", "diffcore")}}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "precision.json").write_text(json.dumps(out, indent=1) + "\n")
    r = out["bf16_over_fp32"]
    print(f"| {out['cpu']['capability']} | AVX512-BF16 {out['cpu']['avx512_bf16']}, AMX {out['cpu']['amx_tile']} | "
          f"{med['F.linear float32']:.3f} / {med['F.linear bfloat16']:.3f} ({r['F.linear']:.2f}x) | "
          f"{med['diffcore float32']:.3f} / {med['diffcore bfloat16']:.3f} ({r['diffcore']:.2f}x) | "
          f"{out['dtype_none_picks_for_bf16_models']} | {out['load_avg'][0]:.1f} |")


if __name__ == "__main__":
    main()
