"""LoRA cost on FLUX-medium (CPU): transformer time per step with no LoRA, one and two unfused adapters and
the two fused, for diffcore and for diffusers + PEFT on the same weights; and the time to load an adapter.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.lora [--rounds 15] [--threads 1]

Adapters: the layers typical FLUX LoRAs train (every attention projection and MLP of the double and
single blocks), diffusers layout, random weights; "style" rank 16 alpha 16 on all of them, "detail"
rank 32 alpha 16 on the attention projections only. One denoising step's transformer inputs (256x256,
256 text tokens) are recorded from a real run, then single transformer calls are timed in rounds
(none, one, two, fused, none, ...), engines alternating within a configuration, fusing and
unfusing outside the timed call; medians over rounds. Writes results/lora.json and prints the
README table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.workloads import WORKLOADS, checkpoint
from diffcore.lora import lora_scope

ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")


def _targets(model, parts) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and "blocks." in name and name.split(".", 2)[2] in parts]


def write_lora(model, path: Path, parts, rank: int, alpha: float, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in _targets(model, parts):
        layer = model.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.01
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.01
        state[f"transformer.{name}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path))
    return len(state) // 3


class CallRecorder:
    """Keeps the arguments of the model's last forward call, to replay single transformer calls."""

    def __init__(self, model):
        self.args = None
        model.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        self.args = (args, dict(kwargs))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds of single transformer calls")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-diffusers", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from diffcore import DiffGenerator

    folder = checkpoint("flux")
    params = {**WORKLOADS["flux"].params, "num_inference_steps": 2}  # one generate per engine captures a step's inputs
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    model = gen.components["transformer"]
    files = {"style": tmp / "style.safetensors", "detail": tmp / "detail.safetensors"}
    n_style = write_lora(model, files["style"], ATTN + MLP, 16, 16, 1)
    n_detail = write_lora(model, files["detail"], ATTN, 32, 16, 2)

    load = []
    for _ in range(5):
        t0 = time.perf_counter()
        gen.load_lora(files["style"])
        load.append(time.perf_counter() - t0)
        gen.unload_lora("style")
    for name, path in files.items():
        gen.load_lora(path, name=name)
    engines = {"diffcore": gen}
    ref_load = []
    if not args.no_diffusers:
        from diffusers import FluxPipeline

        ref = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        for _ in range(3):
            t0 = time.perf_counter()
            ref.load_lora_weights(str(files["style"]), adapter_name="style")
            ref_load.append(time.perf_counter() - t0)
            ref.delete_adapters("style")
        for name, path in files.items():
            ref.load_lora_weights(str(path), adapter_name=name)
        engines["diffusers"] = ref
    models = {e: (p.transformer if e == "diffusers" else p.components["transformer"]) for e, p in engines.items()}
    recorders = {e: CallRecorder(m) for e, m in models.items()}
    configs = {"no LoRA": None, "one unfused": {"style": 1.0}, "two unfused": {"style": 1.0, "detail": 0.5},
               "two fused": {"style": 1.0, "detail": 0.5}}
    gen.generate(**params, seed=0, output_type="latent")
    if "diffusers" in engines:
        engines["diffusers"](**params, generator=torch.Generator().manual_seed(0), output_type="latent")

    def call(engine: str, config: str) -> float:
        """One transformer call (the inputs of a real denoising step) under ``config``; fusing is not timed."""
        sel, fused = configs[config], config == "two fused"
        model, (a, kw) = models[engine], recorders[engine].args
        scope = lora_scope(None if fused else sel) if engine == "diffcore" else contextlib.nullcontext()
        if engine == "diffcore" and fused:
            gen.fuse_lora(sel)
        if engine == "diffusers":
            ref = engines["diffusers"]
            if sel is None:
                ref.disable_lora()
            else:
                ref.enable_lora()
                ref.set_adapters(list(sel), list(sel.values()))
                if fused:
                    ref.fuse_lora(adapter_names=list(sel), lora_scale=1.0)
        with torch.no_grad(), scope:
            t0 = time.perf_counter()
            model(*a, **kw)
            seconds = time.perf_counter() - t0
        if fused:
            gen.unfuse_lora() if engine == "diffcore" else engines["diffusers"].unfuse_lora()
        return seconds

    samples = {(e, c): [] for e in engines for c in configs}
    for e in engines:  # warm-up: packs weights, first-call allocations
        for c in configs:
            call(e, c)
    start_load = os.getloadavg()
    for _ in range(args.rounds):
        for c in configs:
            for e in engines:
                samples[(e, c)].append(call(e, c))
    results = {
        "machine": {"load_start": start_load, "load_end": os.getloadavg(), "threads": args.threads,
                    "torch": torch.__version__},
        "params": {k: v for k, v in params.items() if k != "prompt"},
        "adapters": {"style": {"rank": 16, "layers": n_style}, "detail": {"rank": 32, "layers": n_detail}},
        "load_seconds": {"diffcore": statistics.median(load), **({"diffusers": statistics.median(ref_load)} if ref_load else {})},
        "step_seconds": {f"{e}/{c}": statistics.median(v) for (e, c), v in samples.items()},
        "step_seconds_min": {f"{e}/{c}": min(v) for (e, c), v in samples.items()},
        "step_samples": {f"{e}/{c}": v for (e, c), v in samples.items()},
    }
    out = Path(__file__).resolve().parent / "results" / "lora.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    base = {e: results["step_seconds"][f"{e}/no LoRA"] for e in engines}
    print("| configuration | " + " | ".join(f"{e} s/step" for e in engines) + " | " +
          " | ".join(f"{e} vs no LoRA" for e in engines) + " |")
    print("|---" * (1 + 2 * len(engines)) + "|")
    for c in configs:
        secs = [results["step_seconds"][f"{e}/{c}"] for e in engines]
        print(f"| {c} | " + " | ".join(f"{s:.3f}" for s in secs) + " | " +
              " | ".join(f"{s / base[e]:.2f}x" for s, e in zip(secs, engines)) + " |")
    print("load (s):", results["load_seconds"], "load average:", start_load, "->", results["machine"]["load_end"])


if __name__ == "__main__":
    main()
