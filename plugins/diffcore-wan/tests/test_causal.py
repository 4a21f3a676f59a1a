"""Block-causal (self-forcing) Wan: the KV-cached run against diffusers' Wan transformer recomputing every
block from scratch over all earlier clean blocks with a block-causal mask; the sliding window; one
block == the DMD stage; streaming decode; the pipeline end to end through the API and the CLI."""
from __future__ import annotations

from unittest import mock

import attrs
import numpy as np
import pytest
import torch

from diffcore.cli import main
from diffcore.configs.engine_args import EngineArgs
from diffcore.configs.fewstep import CausalConfig
from diffcore.errors import ConfigError, SamplingParamError
from diffcore.models.kv_cache import CausalKVCache
from diffcore.outputs import VideoWriter
from diffcore.stages import CausalDMDDenoisingStage, DmdDenoisingStage
from diffcore.stages.dmd import FlowGrid
from test_dmd import clone_generator, grid, plain_dmd, request_until
from wan_testlib import ours

KW = dict(height=32, width=48)  # latent 4 x 6 -> 6 tokens per latent frame
SF_TIMESTEPS = FlowGrid(5.0).warp([1000, 750, 500, 250])


class MaskedSelfAttention:
    """diffusers' Wan attention processor with a boolean mask on the self-attention (what training does)."""

    def __init__(self, base, holder):
        self.base, self.holder = base, holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.base(attn, hidden_states, encoder_hidden_states, self.holder["mask"], rotary_emb)


@pytest.fixture(scope="module")
def masked_reference(fewstep_folders):
    from diffusers import WanTransformer3DModel

    with mock.patch.object(WanTransformer3DModel, "_keep_in_fp32_modules", None):
        model = WanTransformer3DModel.from_pretrained(fewstep_folders["causal"], subfolder="transformer").eval()
    holder = {"mask": None}
    for block in model.blocks:
        block.attn1.processor = MaskedSelfAttention(block.attn1.processor, holder)
    return model, holder


def attends(query_end: int, key: int, window: int, sink: int) -> bool:
    """Which key frame a block ending at ``query_end`` sees: the past and itself, bounded by the window."""
    if key >= query_end:
        return False
    return window == -1 or query_end <= window or key < sink or key >= query_end - (window - sink)


def recompute_from_scratch(reference, embeds, x, timesteps, n, window, sink, generator, tokens_per_frame):
    """Self-forcing without a cache: every step of block b runs the whole prefix [clean blocks < b, noisy
    block b] through diffusers' transformer, clean frames at timestep 0, under a block-causal mask."""
    model, holder = reference
    sigma, clean = grid(5.0), []
    for s in range(0, x.shape[2], n):
        e = s + n
        frame_of_query = torch.arange(e).repeat_interleave(tokens_per_frame)
        block_end = (frame_of_query // n + 1) * n
        mask = torch.tensor([[attends(int(q_end), int(k), window, sink) for k in frame_of_query]
                             for q_end in block_end])
        holder["mask"] = mask

        def call(xb, t):
            inp = torch.cat([*clean, xb], dim=2)
            ts = torch.zeros(inp.shape[0], e * tokens_per_frame)
            ts[:, s * tokens_per_frame:] = float(t)
            out = model(hidden_states=inp, timestep=ts, encoder_hidden_states=embeds, return_dict=False)[0]
            return out[:, :, s:e]

        clean.append(plain_dmd(call, x[:, :, s:e], timesteps, sigma, generator))
    return torch.cat(clean, dim=2)


def causal_stage(gen, **causal):
    config = attrs.evolve(gen.config, causal=CausalConfig(**causal))
    return CausalDMDDenoisingStage(config, [gen.components["transformer"]], EngineArgs(progress=False))


@pytest.mark.parametrize("prompt,frames,window,sink", [
    (["a cat", "a red square"], 21, -1, 0),  # 6 latent frames: 3 blocks, nothing evicted
    ("a dog", 29, 5, 1),  # 8 latent frames, a 5-frame window keeping frame 0 as the sink
    ("a dog", 29, 4, 0),
])
def test_kv_cache_equals_block_causal_recompute(fewstep_folders, masked_reference, prompt, frames, window, sink):
    gen = ours(fewstep_folders["causal"])
    n, latent_frames = 2, (frames - 1) // 4 + 1
    stage = causal_stage(gen, num_frames_per_block=n, local_attn_size=window, sink_size=sink)
    req = request_until(gen, "denoising", prompt=prompt, num_frames=frames, seed=3, **KW)
    x, g = req.latents.clone(), clone_generator(req.generator)
    with torch.inference_mode():
        want = recompute_from_scratch(masked_reference, req.prompt_embeds.embeds, x, SF_TIMESTEPS, n, window, sink,
                                      g, tokens_per_frame=6)
        got = stage(req).latents
    diff = (got - want).abs().max().item()
    print(f"causal: frames={latent_frames} window={window} sink={sink} max|diff|={diff:.2e}")
    assert diff <= 1e-5
    if window != -1:  # the window really changed the result
        unbounded = causal_stage(gen, num_frames_per_block=n)
        req = request_until(gen, "denoising", prompt=prompt, num_frames=frames, seed=3, **KW)
        with torch.inference_mode():
            assert (unbounded(req).latents - got).abs().max() > 1e-4


def test_sliding_window_keeps_the_sink_and_the_latest_frames():
    def block(s):  # K of frames s, s + 1 (2 tokens each) hold the frame index
        return torch.tensor([s, s, s + 1, s + 1], dtype=torch.float32).view(1, 4, 1, 1)

    cache = CausalKVCache(num_layers=1, tokens_per_frame=2, num_frames=8, window=5, sink=1)
    layer, held = cache[0], []
    for s in range(0, 8, 2):
        for _ in range(3):  # the denoising steps and the clean pass rewrite the same slots
            keys, values = layer.update(s, block(s), block(s))
        held.append(layer.frames())
        assert keys[0, ::2, 0, 0].tolist() == layer.frames() == values[0, 1::2, 0, 0].tolist()
    assert held == [[0, 1], [0, 1, 2, 3], [0, 2, 3, 4, 5], [0, 4, 5, 6, 7]]
    unbounded = CausalKVCache(num_layers=1, tokens_per_frame=2, num_frames=8)
    for s in range(0, 8, 2):
        unbounded[0].update(s, block(s), block(s))
    assert unbounded[0].frames() == list(range(8))
    with pytest.raises(ValueError, match="does not continue"):
        CausalKVCache(1, 2, 8)[0].update(2, block(2), block(2))
    with pytest.raises(ConfigError, match="local_attn_size"):
        CausalConfig(num_frames_per_block=3, local_attn_size=3, sink_size=1)


def test_one_block_equals_the_dmd_stage(fewstep_folders):
    gen = ours(fewstep_folders["causal"])
    req = request_until(gen, "denoising", prompt=["a cat", "a dog"], num_frames=5, seed=8, **KW)  # 2 latent frames
    twin = attrs.evolve(req, latents=req.latents.clone(), generator=clone_generator(req.generator))
    config = gen.config  # blocks of 2: the whole video is one block
    with torch.inference_mode():
        got = CausalDMDDenoisingStage(config, [gen.components["transformer"]], EngineArgs(progress=False))(req).latents
        want = DmdDenoisingStage(config, [gen.components["transformer"]], EngineArgs(progress=False))(twin).latents
    assert (got - want).abs().max().item() <= 1e-6


def test_pipeline_streams_blocks_that_equal_a_full_decode(fewstep_folders):
    gen = ours(fewstep_folders["causal"])
    assert gen.config.causal.num_frames_per_block == 2 and gen.streams_blocks  # read from transformer/config.json
    blocks = []
    result = gen.generate(prompt="a red cat", num_frames=21, seed=2, output_type="np",
                          block_callback=lambda b, latents, frames: blocks.append((b, latents.shape, frames)), **KW)
    assert [b for b, _, _ in blocks] == [0, 1, 2]  # 6 latent frames in blocks of 2
    assert [f.shape[1] for _, _, f in blocks] == [5, 8, 8]  # 1 + 4 (n - 1), then 4 n video frames
    streamed = np.concatenate([f for _, _, f in blocks], axis=1)
    assert np.array_equal(streamed, result.output) and result.output.shape == (1, 21, 32, 48, 3)
    with torch.inference_mode():  # decoding the final latents in one go gives the same frames
        whole = gen.config.decode(gen.components, result.latents, None).numpy()
    assert np.abs(whole - streamed).max() <= 1e-6
    again = gen.generate(prompt="a red cat", num_frames=21, seed=2, output_type="np", **KW).output
    assert np.array_equal(again, result.output)


def test_step_cache_runs_every_block_through_it(fewstep_folders):
    """``cache=`` is honoured by the block-causal stage: each block's steps go through the request's step cache
    (a threshold of 0 never skips: the video is unchanged), and skipping starts afresh in every block."""
    from diffcore import DiffGenerator

    folder, kw = fewstep_folders["causal"], dict(prompt="a red cat", num_frames=21, seed=2, output_type="np", **KW)
    plain = ours(folder).generate(**kw)
    steps = len(plain_steps := ours(folder).config.dmd.timesteps) * 3  # 6 latent frames: 3 blocks
    assert plain.cache_stats is None and len(plain_steps) > 2
    never = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, cache="fbcache",
                                          cache_threshold=0.0).generate(**kw)
    assert never.cache_stats == {"computed": steps, "skipped": 0}
    assert np.abs(never.output - plain.output).max() <= 1e-5  # the protocol path, not forward: float rounding only
    skips = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, cache="fbcache",
                                          cache_threshold=1e9).generate(**kw)
    # every block computes its first step (no memory of the block before), FBCache skips all the others
    assert skips.cache_stats == {"computed": 3, "skipped": steps - 3}
    assert np.isfinite(skips.output).all() and np.abs(skips.output - plain.output).max() > 1e-3


def test_frames_that_do_not_fill_blocks_are_refused(fewstep_folders):
    with pytest.raises(SamplingParamError, match="num_frames=21 or 29") as e:  # 25 frames -> 7 latent frames
        ours(fewstep_folders["causal"]).generate(prompt="a cat", num_frames=25, **KW)
    assert e.value.param == "num_frames"  # the user's parameter, named


def test_cli_writes_the_causal_video_progressively(fewstep_folders, tmp_path, capsys):
    imageio = pytest.importorskip("imageio.v2")
    out = tmp_path / "causal.mp4"
    written = []
    real_append = VideoWriter.append

    def spy(self, frames):
        written.append(len(frames))
        return real_append(self, frames)

    with mock.patch("diffcore.outputs.VideoWriter.append", spy):
        code = main(["generate", "--model", str(fewstep_folders["causal"]), "--prompt", "a cat", "--num-frames", "13",
                     "--height", "32", "--width", "48", "--quiet", "--dtype", "float32", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert written == [5, 8]  # one append per decoded block
    reader = imageio.get_reader(str(out))
    try:
        assert len([f for f in reader]) == 13 and reader.get_meta_data()["fps"] == 16
    finally:
        reader.close()
    code = main(["generate", "--model", str(fewstep_folders["causal"]), "--prompt", "a cat", "--num-frames", "9",
                 "--height", "32", "--width", "48", "--quiet", "--output", str(tmp_path / "x.mp4")])
    assert code == 2 and "blocks of 2" in capsys.readouterr().err
