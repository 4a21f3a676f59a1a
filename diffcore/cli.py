"""The ``diffcore`` command line: ``generate``, ``serve`` and ``plugins``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .configs.engine_flags import add_engine_flags, add_lora_flag, engine_kwargs, gguf_files, parse_lora_flag

DEFAULT_MODEL = "demo"


def _plugins(args) -> int:
    from .plugins import get_plugin_manager

    manager = get_plugin_manager()
    registry = manager.registry
    plugins = []

    def own(kind: str, name: str) -> dict:
        return {n: e.record for n, e in sorted(registry.tables[kind].items()) if e.plugin == name}

    for name, info in manager.plugins.items():
        pipelines = own("pipelines", name)
        compositions = own("compositions", name)
        plugins.append({"name": name, "distribution": info.distribution, "version": info.version,
                        "pipelines": list(pipelines), "models": list(own("configs", name)),
                        "compositions": [{"name": n, "pipeline": r.pipeline_name, "task": r.task,
                                          "description": r.description} for n, r in compositions.items()],
                        "stages": list(own("stages", name)),
                        "descriptions": {n: r.description for n, r in pipelines.items() if r.description}})
    errors = [{"plugin": e.plugin, "error": e.error} for e in manager.errors]
    if args.json:
        print(json.dumps({"plugins": plugins, "errors": errors}, indent=2))
        return 0
    for p in plugins:
        state = "  DISABLED (conflict, see below)" if p["name"] in manager.disabled else ""
        print(f"{p['name']:<10} {p['distribution'] or '-'} {p['version'] or ''}".rstrip() + state)
        for pipeline in p["pipelines"]:
            described = p["descriptions"].get(pipeline)
            print(f"{'':<10} pipeline  {pipeline}" + (f": {described}" if described else ""))
        for comp in p["compositions"]:  # extra tasks served by a loaded pipeline, chosen per request
            print(f"{'':<10} task      {comp['task']} on {comp['pipeline']}: {comp['name']}"
                  + (f" ({comp['description']})" if comp["description"] else ""))
        for label in ("models", "stages"):
            if p[label]:
                print(f"{'':<10} {label:<9} {', '.join(p[label])}")
    for e in errors:
        print(f"ERROR {e['plugin']}: {e['error']}")
    return 0


def parse_lora(text: str) -> tuple[str, float]:
    """``[NAME=]PATH[:WEIGHT]`` -> ``(path, weight)`` (weight 1.0 when not given)."""
    flag = parse_lora_flag(text)
    return flag.path, 1.0 if flag.weight is None else flag.weight


def _generate(args) -> int:
    from .api import DiffGenerator
    from .errors import DiffcoreError

    try:
        from .outputs import check_save_path

        check_save_path(args.output, writable=True)  # before minutes of loading and generating
        gen = DiffGenerator.from_pretrained(args.model, progress=not args.quiet, **engine_kwargs(args))
        loras = {}
        for spec in args.lora or ():
            name = gen.load_lora(spec.path, name=spec.name or f"lora{len(loras)}")
            loras[name] = 1.0 if spec.weight is None else spec.weight
        images = args.image if args.image else None
        if images is not None and len(images) == 1:
            images = images[0]
        extra = {"timesteps": args.timesteps} if args.timesteps else {}
        extra.update({k: v for k, v in (("strength", args.strength), ("mask", args.mask),
                                        ("padding_mask_crop", args.padding_mask_crop)) if v is not None})
        if loras:
            extra["loras"] = loras
        kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, image=images, height=args.height,
                      width=args.width, num_frames=args.num_frames, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, true_cfg_scale=args.true_cfg_scale,
                      flow_shift=args.flow_shift, seed=args.seed, **extra)
        if gen.streams_blocks and str(args.output).lower().endswith(".mp4"):
            result, path = _generate_streaming(gen, args.output, kwargs)
        else:
            result = gen.generate(**kwargs)
            if gen.rank != 0:  # under torchrun every rank holds the same result; rank 0 writes it
                return 0
            path = ", ".join(map(str, result.save_layers(args.output))) if result.layers else result.save(args.output)
    except DiffcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = result.timings.get("total", 0.0)
    print(f"wrote {path} ({gen.model}, {total:.1f}s)")
    return 0


def _generate_streaming(gen, output: str, kwargs: dict):
    """Block-causal video: append each block's frames to the mp4 as soon as the block is decoded."""
    from pathlib import Path

    from .outputs import VideoWriter

    writer = None

    def on_block(block, latents, frames):
        nonlocal writer
        if writer is None:
            fps = kwargs.get("fps") or gen.config.default_fps
            writer = VideoWriter(output, fps)
        writer.append(frames[0])

    try:
        result = gen.generate(block_callback=on_block, output_type="np", **kwargs)
    finally:
        if writer is not None:
            writer.close()
    return result, Path(output)


_gguf_files = gguf_files  # the --gguf values as EngineArgs.gguf


def _looks_local(text: str) -> bool:
    from pathlib import Path

    return Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or text.endswith(".safetensors")


def check_local_sources(model: str, loras) -> None:
    """A --model / --lora that names a local path must be there (Hub ids and aliases are resolved by the load)."""
    from .loader import resolve_model_path
    from .lora.source import resolve_lora_file

    if _looks_local(str(model)):
        resolve_model_path(model)
    for path in loras:
        if _looks_local(str(path)):
            resolve_lora_file(path)


def _serve(args) -> int:
    import os

    from .errors import ConfigError

    try:
        from .serve.server import serve
        from .serve.settings import ServeSettings
        from .serve.store import default_state_dir

        settings = ServeSettings(
            host=args.host, port=args.port,
            api_key=args.api_key if args.api_key is not None else os.environ.get("DIFFCORE_API_KEY"),
            served_model_name=args.served_model_name, max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms, step_batching=args.step_batching == "on", max_queue=args.max_queue,
            request_timeout=args.request_timeout,
            max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes,
            max_upload_pixels=args.max_upload_pixels, file_ttl=args.file_ttl, cors_origins=args.cors_origin or (),
            allowed_hosts=args.allowed_host or (),
            state_dir=args.state_dir or str(default_state_dir(args.port)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: diffcore serve needs the serve extra ({exc.name} is missing): pip install 'diffcore[serve]'",
              file=sys.stderr)
        return 2
    engine = dict(progress=False, **engine_kwargs(args))
    loras = list(args.lora or ())
    if args.replicas < 1:
        print(f"error: --replicas must be >= 1, got {args.replicas}", file=sys.stderr)
        return 2
    from .serve.torchrun import check_launch, layout_world

    try:
        check_launch(engine)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.replicas > 1 or args.ray_address:
        if layout_world(engine) > 1:
            print("error: --replicas/--ray-address do not start torchrun groups; serve each --sp-degree/--cfg-parallel "
                  "group with torchrun and put a load balancer in front (docs/scale.md)", file=sys.stderr)
            return 2
        try:
            from .serve.ray import run

            import ray  # noqa: F401  (serve.ray imports it only when it runs: check here, before anything starts)
            import ray.serve  # noqa: F401
        except ImportError as exc:
            print(f"error: --replicas/--ray-address need the ray extra ({exc.name} is missing): "
                  "pip install 'diffcore[ray]'", file=sys.stderr)
            return 2
        run(args.model, settings, engine, args.replicas, args.ray_address or "local", args.replica_cpus,
            args.replica_gpus, args.replica_max_requests, loras)
        return 0
    check_local_sources(args.model, [flag.path for flag in loras])  # one line and exit 2, before binding the port
    return serve(args.model, settings, engine, log_level=args.log_level, loras=loras)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP (OpenAI Images and Videos APIs, playground at /)")
    s.add_argument("--model", default=DEFAULT_MODEL, help="Diffusers folder, Hugging Face id or alias (default: demo)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=30010)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /metrics (or set DIFFCORE_API_KEY)")
    s.add_argument("--served-model-name", help="model id shown by /v1/models and matched against `model` (default: --model)")
    s.add_argument("--max-batch-size", type=int, default=8, help="most requests run as one batch")
    s.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch waits for company")
    s.add_argument("--step-batching", choices=["on", "off"], default="on",
                   help="requests join a running batch at its next denoising step (default on; off: batches "
                        "form only when they start)")
    s.add_argument("--max-queue", type=int, default=64, help="queued requests before 429")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take before 504")
    s.add_argument("--max-body-bytes", type=int, default=32 * 2**20, help="largest request body (413 past it)")
    s.add_argument("--max-upload-bytes", type=int, default=16 * 2**20, help="largest uploaded image file")
    s.add_argument("--max-upload-pixels", type=int, help="largest uploaded image, in pixels (default: the engine's max_pixels)")
    s.add_argument("--file-ttl", type=float, default=3600.0, help="seconds `url` images and videos are kept")
    s.add_argument("--state-dir", help="folder for video jobs and kept files (SQLite + files; survives restarts; one "
                                       "server per folder; default: ~/.cache/diffcore/serve/port-PORT)")
    s.add_argument("--cors-origin", action="append", help="allow browser requests from this origin (repeatable; default: none)")
    s.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*': any; default: 127.0.0.1, "
                        "localhost, [::1] and --host)")
    add_lora_flag(s, "load a LoRA at startup (repeatable): requests pick it with loras={NAME: weight}; with :WEIGHT "
                     "it is fused into the weights for every request instead")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_flags(s)
    r = s.add_argument_group("replicas (Ray Serve, the diffcore[ray] extra; docs/scale.md)")
    r.add_argument("--replicas", type=int, default=1, help="serve N replicas behind Ray Serve's router")
    r.add_argument("--ray-address", help="'local' (start Ray here), 'auto' (join the running cluster) or ray://HOST:PORT")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    r.add_argument("--replica-max-requests", type=int,
                   help="requests Ray hands one replica at a time (default: --max-batch-size)")
    s.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffcore", description="Run diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate an image or a video")
    g.add_argument("--model", default=DEFAULT_MODEL, help="Diffusers folder, Hugging Face id or alias (default: demo)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--image", nargs="+", help="input image(s) for editing / image-to-video models")
    g.add_argument("--mask", help="inpainting: a mask image (white = repaint, or a PNG whose transparent pixels mark the area)")
    g.add_argument("--strength", type=float, help="image-to-image / inpainting: how much of --image is repainted (0-1]")
    g.add_argument("--padding-mask-crop", type=int, help="inpainting: paint only the box around the mask, padded by "
                                                         "this many pixels, at the full output size, and paste it back")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-frames", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--true-cfg-scale", type=float)
    g.add_argument("--timesteps", type=float, nargs="+", help="few-step (DMD) models: the timesteps to sample at")
    g.add_argument("--flow-shift", type=float, help="flow shift of the schedule (default: the checkpoint's)")
    g.add_argument("--seed", type=int, default=0)
    add_lora_flag(g, "apply a LoRA (file, folder or Hub id) with a weight (default 1.0); repeatable")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_flags(g)
    g.add_argument("--output", required=True, help="output file: .png/.jpg/.webp, or .mp4 for videos")
    g.set_defaults(func=_generate)
    _add_serve(sub)
    p = sub.add_parser("plugins", help="list installed plugins and load errors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plugins)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .errors import DiffcoreError

    try:
        return args.func(args)
    except DiffcoreError as exc:  # every command: a user error is one line and exit 2, never a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
