"""Markdown tables from a results document (benchmarks/results/*.json), and the README update."""
from __future__ import annotations

import re
from pathlib import Path


def _f(x, fmt=".2f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"Machine: {m['cpu']} (lscpu model name), {m['cores']} cores; GPU: {m['gpu']}. Python {m['python']}, torch {m['torch']}, "
        f"diffusers {m['diffusers']}. Started {doc['started']}, load average at start "
        f"{', '.join(f'{x:.1f}' for x in doc['load_avg_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in doc['load_avg_end'])} (other jobs shared the 2 cores). "
        f"Command: `{doc['command']}`; torch threads per engine: {doc.get('threads', 'torch default')}; "
        f"{doc['pairs']} timed A/B pairs after one warm-up each.",
        "",
        f"Measured matmul peak (2048³, best of 10): fp32 {doc['matmul']['fp32']['gflops_best']:.0f} GFLOP/s, "
        f"bf16 {doc['matmul']['bf16']['gflops_best']:.0f} GFLOP/s.",
        "",
        'Checkpoints: each row runs and loads a checkpoint stored in the dtype of its "ckpt" column (bf16: a '
        "file-level bf16 copy of the fp32 one, as the public FLUX, Qwen-Image and Wan 2.2 checkpoints are stored; Wan 2.1 ships fp32). Load: "
        f"`from_pretrained` in fresh processes, imports excluded, median of {doc.get('load_pairs', '?')} per engine; "
        '"fp32 ckpt cast": bf16 loaded from the fp32-stored checkpoint, every weight converted at load.',
        "",
        "| workload | dtype | ckpt | diffusers s | diffcore s | speed-up (median, min–max) | text enc s (df / dc) "
        "| denoise s/step (df / dc) | VAE decode s (df / dc) | load s, ckpt as stored (df / dc) | load speed-up "
        "| load s, fp32 ckpt cast (df / dc, speed-up) | peak RSS MB (df / dc) | max abs diff | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        a, b = r["engines"]["diffusers"], r["engines"]["diffcore"]
        s, o = r["speedup"], r["output"]
        cast = "–"
        if "load_cast" in r:
            c = r["load_cast"]["engines"]
            cast = (f"{c['diffusers']['load']['median']:.2f} / {c['diffcore']['load']['median']:.2f}, "
                    f"{r['load_cast']['speedup']:.2f}x")
        lines.append(
            f"| {r['workload']}{' (compiled)' if r.get('compile') else ''} | {r['dtype']} | {r.get('checkpoint_dtype', 'fp32')} "
            f"| {a['total_s']['median']:.2f} | {b['total_s']['median']:.2f} "
            f"| **{s['median']:.2f}x** ({s['min']:.2f}–{s['max']:.2f}) "
            f"| {a['text_encoding_s']:.3f} / {b['text_encoding_s']:.3f} "
            f"| {a['denoising_step_s']:.3f} / {b['denoising_step_s']:.3f} "
            f"| {a['decoding_s']:.3f} / {b['decoding_s']:.3f} "
            f"| {a['load']['median']:.2f} / {b['load']['median']:.2f} | {r['load_speedup']:.2f}x | {cast} "
            f"| {a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} "
            f"| {_f(o.get('max_abs_diff'), '.1e')} | {_f(o.get('psnr_db'), '.1f')} |")
    cpu = [r for r in doc["results"] if "cpu_speedup" in r]
    if cpu:
        lines += ["", "The same runs in process CPU time (user + system; with one torch thread it leaves out the time "
                      "spent waiting for a core, which dominates wall time when other jobs share the machine):", "",
                  "| workload | dtype | diffusers CPU s | diffcore CPU s | speed-up (median, min–max) |", "|---|---|---|---|---|"]
        for r in cpu:
            a, b, s = r["engines"]["diffusers"]["cpu_s"], r["engines"]["diffcore"]["cpu_s"], r["cpu_speedup"]
            lines.append(f"| {r['workload']} | {r['dtype']} | {a['median']:.2f} | {b['median']:.2f} "
                         f"| **{s['median']:.2f}x** ({s['min']:.2f}–{s['max']:.2f}) |")
    flops = [r for r in doc["results"] if "achieved_gflops" in r]
    if flops:
        lines += ["", "FLUX transformer step (diffcore), achieved vs measured matmul peak:", "",
                  "| dtype | GFLOP per call | s per call | achieved GFLOP/s | of fp32 peak | of bf16 peak |",
                  "|---|---|---|---|---|---|"]
        for r in flops:
            step = r["engines"]["diffcore"]["denoising_step_s"]
            lines.append(f"| {r['dtype']} | {r['flops_per_call'] / 1e9:.1f} | {step:.3f} | {r['achieved_gflops']:.0f} "
                         f"| {100 * r['fraction_of_peak']['fp32']:.0f}% | {100 * r['fraction_of_peak']['bf16']:.0f}% |")
    bf = [r for r in doc["results"] if "bf16_vs_fp32" in r]
    if bf:
        lines += ["", "bf16 output against the same engine's fp32 output:", "",
                  "| workload | diffusers PSNR dB | diffcore PSNR dB | diffusers max abs diff | diffcore max abs diff |",
                  "|---|---|---|---|---|"]
        for r in bf:
            d, c = r["bf16_vs_fp32"].get("diffusers", {}), r["bf16_vs_fp32"].get("diffcore", {})
            lines.append(f"| {r['workload']} | {_f(d.get('psnr_db'), '.1f')} | {_f(c.get('psnr_db'), '.1f')} "
                         f"| {_f(d.get('max_abs_diff'), '.2f')} | {_f(c.get('max_abs_diff'), '.2f')} |")
    for r in doc["results"]:
        if not r.get("cache_curve"):
            continue
        base = r["engines"]["diffusers"]["total_s"]["median"]
        own = r["engines"]["diffcore"]["total_s"]["median"]
        lines += ["", f"Step caching, {r['workload']} {r['dtype']}, {r['params']['num_inference_steps']} steps "
                      f"(PSNR against uncached diffcore; speed-up against uncached diffusers {base:.2f} s "
                      f"and uncached diffcore {own:.2f} s):", "",
                  "| policy | threshold | transformer calls run / skipped | s | vs diffusers | vs diffcore | PSNR dB |",
                  "|---|---|---|---|---|---|---|"]
        for c in r["cache_curve"]:
            st = c.get("stats", {})
            t = c["total_s"]["median"]
            lines.append(f"| {c['policy']} | {c['threshold']} | {st.get('computed', '–')} / {st.get('skipped', '–')} "
                         f"| {t:.2f} | **{base / t:.2f}x** | {own / t:.2f}x | {_f(c.get('psnr_db'), '.1f')} |")
    for e in doc.get("errors", []):
        lines += ["", f"**{e['workload']} {e['dtype']} failed:** {e['error']}"]
    return "\n".join(lines) + "\n"


def update_readme(path: Path, table: str, section: str = "latest") -> None:
    """Replace the text between ``<!-- results[:section]:start/end -->`` markers (appended if absent)."""
    tag = "results" if section == "latest" else f"results:{section}"
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table}{end}", text, flags=re.S)
    path.write_text(text)
