"""Audio as a result's output: .wav, an AAC track muxed into the mp4 (read back with the bundled ffmpeg),
the dataflow proof of a pipeline that promises a sound track, and the video job's has_audio."""
from __future__ import annotations

import wave

import numpy as np
import pytest

from diffcore.audio import read_audio
from diffcore.errors import InputError, PipelineDataflowError
from diffcore.outputs import GenerationResult

RATE, FPS, FRAMES = 24000, 8, 9


def _result(audio: bool = True, batch: int = 1) -> GenerationResult:
    rng = np.random.default_rng(0)
    frames = rng.random((batch, FRAMES, 32, 32, 3), dtype=np.float32)
    t = np.arange(int(RATE * FRAMES / FPS)) / RATE
    tones = np.stack([np.stack([0.5 * np.sin(2 * np.pi * f * (b + 1) * t) for f in (440, 660)]) for b in range(batch)])
    return GenerationResult(output=frames, latents=None, timings={}, is_video=True, fps=FPS,
                            audios=tones.astype(np.float32) if audio else None,
                            audio_sample_rate=RATE if audio else None)


def _peak_hz(signal: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(signal))
    return float(np.fft.rfftfreq(len(signal), 1 / RATE)[spectrum.argmax()])


def test_mp4_carries_the_sound_track(tmp_path):
    import imageio.v3 as iio

    result = _result(batch=2)
    assert result.audio.shape == (2, int(RATE * FRAMES / FPS))  # (channels, samples) of the first item
    path = result.save(tmp_path / "out.mp4", index=1)
    assert iio.imread(path, plugin="FFMPEG").shape[0] == FRAMES  # the video stream is intact
    sound, rate = read_audio(path)
    assert rate == RATE and sound.shape[0] == 2
    assert abs(sound.shape[1] / rate - FRAMES / FPS) < 0.05  # the track lasts as long as the video
    # AAC is lossy: the signal survives as the same tones, per channel, of item 1 (880 and 1320 Hz)
    assert abs(_peak_hz(sound[0]) - 880) < 5 and abs(_peak_hz(sound[1]) - 1320) < 5
    n = min(sound.shape[1], result.audios.shape[2])
    assert np.corrcoef(sound[0, 2048:n - 2048], result.audios[1, 0, 2048:n - 2048])[0, 1] > 0.95


def test_silent_mp4_has_no_audio_stream(tmp_path):
    path = _result(audio=False).save(tmp_path / "silent.mp4")
    with pytest.raises(InputError, match="no audio stream"):
        read_audio(path)


def test_wav_writes_the_sound_alone(tmp_path):
    result = _result()
    path = result.save(tmp_path / "out.wav")
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getframerate(), f.getsampwidth()) == (2, RATE, 2)
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2").reshape(-1, 2).T
    np.testing.assert_allclose(pcm / 32767, result.audio, atol=1 / 32767)
    with pytest.raises(InputError, match="no sound track"):
        _result(audio=False).save(tmp_path / "silent.wav")


def test_dataflow_proof_covers_audio():
    from diffcore.configs import PipelineConfig
    from diffcore.pipeline import ComposedPipelineBase
    from diffcore.stages.base import Out, PipelineStage

    class Decode(PipelineStage):
        outputs = (Out("output"),)

    class Vocode(PipelineStage):
        outputs = (Out("audio"), Out("audio_sample_rate"))

    class SoundConfig(PipelineConfig):
        has_audio = True

    def build(*stages):
        class P(ComposedPipelineBase):
            pipeline_name = "SoundPipeline"

            def create_pipeline_stages(self, engine_args):
                for s in stages:
                    self.add_stage(type(s).__name__, s)

        return P({}, SoundConfig())

    with pytest.raises(PipelineDataflowError, match="'audio'"):
        build(Decode())
    assert [s.name for s in build(Decode(), Vocode()).stages] == ["Decode", "Vocode"]


def test_video_job_says_it_has_audio(tmp_path):
    from diffcore.serve.files import FileStore
    from diffcore.serve.jobs import VideoJob, VideoJobs
    from diffcore.serve.store import StateStore
    from diffcore.serve.videos import ENCODERS

    store = StateStore(tmp_path / "state")
    files = FileStore(store, ttl=60)
    jobs = VideoJobs(runner=None, files=files, store=store, model="m", max_jobs=4, ttl=60,
                     encoders={"video": ENCODERS["video"]})
    try:
        for audio in (True, False):
            job = VideoJob(id="video_x", model="m", prompt="p", size=None, seconds=None, created_at=0)
            jobs._write(job, _result(audio=audio))
            assert job.status == "completed" and job.to_json()["has_audio"] is audio
            if audio:  # the served file itself carries the track
                assert read_audio(files.get(job.files["video"]).path)[1] == RATE
    finally:
        jobs.close()
        store.close()
