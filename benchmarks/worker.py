"""One engine in its own process: load a checkpoint, then run requests on command.

The orchestrator (benchmarks/run.py) talks to it with one JSON object per line: commands on stdin,
replies on the original stdout (library prints are sent to stderr). Separate processes give each
engine its own peak RSS (VmHWM) and keep one engine's allocator state out of the other's timings.

Commands: {"cmd": "load"}, {"cmd": "run", "params": {...}, "out": "x.npy", "cache": None}, where ``cache`` is
{"name": policy, "threshold": t} for diffcore or {"cache_dit": {...}, "taylorseer": order} for diffusers,
{"cmd": "flops", "params": {...}}, {"cmd": "rss"}, {"cmd": "exit"}; ``python -m benchmarks.worker matmul``
measures matmul throughput instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the protocol stream
sys.stdout = sys.stderr

import numpy as np  # noqa: E402
import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key.lower() + "_mb"] = int(value.split()[0]) / 1024
    return out


def _extra_flops():
    """FlopCounterMode counts neither the CPU flash-attention op nor oneDNN's fused linear; add both."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def linear(x, w, *args, out_shape=None, **kwargs):
        rows = 1
        for d in x[:-1]:
            rows *= d
        return 2 * rows * w[0] * w[1]

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
            torch.ops.mkldnn._linear_pointwise: linear}


def _tensor_bytes(t) -> int:
    """Bytes a (possibly quantized) tensor really holds: torchao tensors by their inner tensors, GGUF
    weights by their packed bytes."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _preimport(folder: str) -> None:
    """Import every class model_index.json names (both engines), so load times exclude Python imports."""
    import importlib

    index = json.loads(open(os.path.join(folder, "model_index.json")).read())
    for value in index.values():
        if isinstance(value, list) and len(value) == 2 and value[0]:
            try:
                getattr(importlib.import_module(value[0]), value[1])
            except (ImportError, AttributeError):
                pass


class Engine:
    """Common driver: ``load()``, ``run(params) -> (output, stage timings)``, ``transformer``."""

    def __init__(self, folder: str, dtype: str, pipeline: str, compile: bool = False):
        self.folder, self.dtype, self.pipeline_name, self.compile = folder, DTYPES[dtype], pipeline, compile
        self.pipe = None
        self._captured = None

    def capture_transformer_inputs(self, model):
        def hook(module, args, kwargs):
            if self._captured is None:
                self._captured = (args, dict(kwargs))

        return model.register_forward_pre_hook(hook, with_kwargs=True)

    def flops(self, params: dict) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        self._captured = None
        handle = self.capture_transformer_inputs(self.transformer)
        try:
            self.run({**params, "num_inference_steps": 2}, None)
        finally:
            handle.remove()
        args, kwargs = self._captured
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_extra_flops()) as counter:
            self.transformer(*args, **kwargs)
        return float(counter.get_total_flops())


class DiffusersEngine(Engine):
    def preload(self):
        import diffusers
        import transformers  # noqa: F401

        self.cls = getattr(diffusers, self.pipeline_name)
        _preimport(self.folder)

    def load(self):
        self.pipe = None
        if self.pipeline_name.startswith("Wan"):
            # Without accelerate, diffusers refuses to load a model that declares _keep_in_fp32_modules
            # (Wan's time/text embedders and norms); dropping the declaration is what its own tests do.
            from diffusers import WanTransformer3DModel

            WanTransformer3DModel._keep_in_fp32_modules = None
        self.pipe = self.cls.from_pretrained(self.folder, dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer
        self._instrument()

    def _instrument(self):
        pipe, marks = self.pipe, {}
        self.marks = marks
        encode = pipe.encode_prompt

        def timed_encode(*a, **k):
            t0 = time.perf_counter()
            try:
                return encode(*a, **k)
            finally:
                marks["text"] = marks.get("text", 0.0) + time.perf_counter() - t0

        pipe.encode_prompt = timed_encode
        decode = pipe.vae.decode

        def timed_decode(*a, **k):
            marks.setdefault("decode_start", time.perf_counter())
            try:
                return decode(*a, **k)
            finally:
                marks["decode_end"] = time.perf_counter()

        pipe.vae.decode = timed_decode

        def first_call(module, args, kwargs):
            marks.setdefault("denoise_start", time.perf_counter())

        self.transformer.register_forward_pre_hook(first_call, with_kwargs=True)

    def _cache_dit(self, cache):
        """Apply cache-dit (benchmark-only peer) with {"cache_dit": {DBCacheConfig fields}, "taylorseer": order}."""
        if getattr(self, "_cache_dit_on", False):
            import cache_dit

            cache_dit.disable_cache(self.pipe)
            self._cache_dit_on = False
        if not cache or "cache_dit" not in cache:
            return  # runs without cache-dit need no cache_dit install (it is only in the --bench extras)
        import cache_dit

        calibrator = None
        if cache.get("taylorseer"):
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=cache["taylorseer"])
        cache_dit.enable_cache(self.pipe, cache_config=cache_dit.DBCacheConfig(**cache["cache_dit"]),
                               calibrator_config=calibrator)
        self._cache_dit_on = True

    def run(self, params: dict, cache):
        p = dict(params)
        seed = p.pop("seed", 0)
        self._cache_dit(cache)
        self.marks.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(**p, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        total = time.perf_counter() - t0
        m = self.marks
        images = out.frames if hasattr(out, "frames") else out.images
        stages = {"text_encoding": m.get("text", 0.0), "denoising": m["decode_start"] - m["denoise_start"],
                  "decoding": m["decode_end"] - m["decode_start"]}
        if getattr(self, "_cache_dit_on", False):
            import cache_dit

            st = cache_dit.summary(self.pipe, logging=False)[0]
            diffs = sorted(float(v) for v in {**st.residual_diffs, **st.cfg_residual_diffs}.values())
            skipped = len(st.cached_steps) + len(st.cfg_cached_steps)
            calls = p.get("num_inference_steps", 0) * (2 if p.get("negative_prompt") and "Wan" in self.pipeline_name else 1)
            stages["cache_stats"] = {"computed": calls - skipped, "skipped": skipped,
                                     "residual_diff_median": diffs[len(diffs) // 2] if diffs else None}
        return np.asarray(images, dtype=np.float32), total, stages


class DiffcoreEngine(Engine):
    def preload(self):
        import transformers  # noqa: F401

        from diffcore import DiffGenerator
        from diffcore.plugins import get_plugin_manager

        self.cls = DiffGenerator
        self.registry = get_plugin_manager().registry
        _preimport(self.folder)
        index = json.loads(open(os.path.join(self.folder, "model_index.json")).read())
        for value in index.values():  # diffcore's own module and scheduler classes (imported on first use)
            for table in (self.registry.module_classes(), self.registry.scheduler_classes()):
                if isinstance(value, list) and value[1] in table:
                    table[value[1]]
        # the pipeline class and its config/sampling records (diffusers' preload imports its pipeline class)
        from pathlib import Path

        from diffcore.loader import read_model_index
        from diffcore.records import resolve_ref

        model_index = read_model_index(self.folder)
        self.registry.get("pipelines", model_index.class_name)
        rec = self.registry.select_config(self.folder, model_index, Path(self.folder))
        resolve_ref(rec.pipeline_config), resolve_ref(rec.sampling_params)

    def load(self):
        self.pipe = None
        self.pipe = self.cls.from_pretrained(self.folder, dtype=self.dtype, progress=False, compile=self.compile,
                                             **self.engine_args)
        self.transformer = self.pipe.components["transformer"]

    def run(self, params: dict, cache):
        t0 = time.perf_counter()
        req = self.pipe.new_request(self.pipe.sampling_params_cls.from_user(**params, output_type="np"))
        if cache:  # a step cache for this request only (the engine was loaded without one)
            req.step_cache = self.registry.get("cache_policies", cache["name"])(threshold=cache["threshold"])
        result = self.pipe.result(self.pipe.pipeline.forward(req))
        total = time.perf_counter() - t0
        stages = {k: result.timings.get(k, 0.0) for k in ("text_encoding", "denoising", "decoding")}
        if result.cache_stats is not None:
            stages["cache_stats"] = result.cache_stats
        return np.asarray(result.output, dtype=np.float32), total, stages


def serve(args) -> None:
    engine = (DiffusersEngine if args.engine == "diffusers" else DiffcoreEngine)(args.folder, args.dtype, args.pipeline,
                                                                                 args.compile)
    engine.engine_args = json.loads(args.engine_args)
    engine.preload()
    if args.threads:
        torch.set_num_threads(args.threads)
    _reply({"ready": True, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "load":
            t0 = time.perf_counter()
            engine.load()
            weights = sum(_tensor_bytes(p) for p in engine.transformer.parameters()) / 2**20
            _reply({"load_s": time.perf_counter() - t0, "transformer_mb": weights, **_status()})
        elif name == "run":
            cpu = time.process_time()  # CPU time of this process: what waiting for a core on a busy machine leaves out
            output, total, stages = engine.run(cmd["params"], cmd.get("cache"))
            cpu = time.process_time() - cpu
            if cmd.get("out"):
                np.save(cmd["out"], output)
            _reply({"total_s": total, "cpu_s": cpu, "stages": stages, **_status()})
        elif name == "flops":
            _reply({"flops": engine.flops(cmd["params"])})
        elif name == "rss":
            _reply(_status())
        elif name == "exit":
            _reply(_status())
            return
        else:
            _reply({"error": f"unknown command {name!r}"})


def matmul(args) -> None:
    """Best-of-N time of an n x n x n matmul per dtype -> GFLOP/s (the machine's practical peak)."""
    n, out = args.n, {}
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, dtype in DTYPES.items():
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        out[name] = {"gflops_best": 2 * n**3 / min(times) / 1e9, "gflops_median": 2 * n**3 / float(np.median(times)) / 1e9}
    out["threads"] = torch.get_num_threads()
    _reply(out)


def fastpaths(args) -> None:
    """Which CPU fast paths a diffcore worker takes here (diffcore.fastpaths.report) and the CPU torch sees."""
    from diffcore import fastpaths as paths

    if args.threads:
        torch.set_num_threads(args.threads)
    _reply({**paths.report(), "threads": torch.get_num_threads()})


def _reply(obj) -> None:
    _PROTO.write(json.dumps(obj) + "\n")
    _PROTO.flush()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--engine", choices=["diffusers", "diffcore"], required=True)
    s.add_argument("--folder", required=True)
    s.add_argument("--pipeline", required=True)
    s.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--compile", action="store_true", help="diffcore: EngineArgs(compile=True)")
    s.add_argument("--engine-args", default="{}", help="diffcore: more EngineArgs as JSON (quantization, gguf, ...)")
    m = sub.add_parser("matmul")
    m.add_argument("--n", type=int, default=2048)
    m.add_argument("--repeat", type=int, default=10)
    m.add_argument("--threads", type=int, default=0)
    f = sub.add_parser("fastpaths")
    f.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        {"serve": serve, "matmul": matmul, "fastpaths": fastpaths}[args.mode](args)
    except Exception as e:  # report, so the orchestrator can show it
        import traceback

        traceback.print_exc()
        _reply({"error": f"{type(e).__name__}: {e}"})
        raise SystemExit(1)


if __name__ == "__main__":
    main()
