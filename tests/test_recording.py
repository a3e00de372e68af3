"""Recording, below the gateway: the stereo timeline on the call clock, the WAV and Ogg/Opus
files the writer thread makes, and the local directory's storage and retention."""

from __future__ import annotations

import asyncio
import os
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from service.gateway.recording.encoders import OggOpusEncoder
from service.gateway.recording.storage import LocalStorage, NotStored
from service.gateway.recording.timeline import LEFT, RIGHT, StereoTimeline
from service.gateway.recording.writer import RecordingWriter

RATE = 16000


def tone(seconds: float, freq: float = 440.0, rate: int = RATE, level: float = 8000.0) -> np.ndarray:
    n = round(seconds * rate)
    return (np.sin(2 * np.pi * freq * np.arange(n) / rate) * level).astype(np.int16)


def run(timeline: StereoTimeline, duration: float) -> np.ndarray:
    out = [timeline.blocks()]
    out.append(timeline.finish(duration))
    return np.concatenate(out)


def decode(path: Path) -> tuple[np.ndarray, int]:
    """A recording file as (frames (n, 2) float in [-1, 1], rate)."""
    if path.suffix == ".wav":
        with wave.open(str(path)) as w:
            assert w.getnchannels() == 2 and w.getsampwidth() == 2
            data = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
            return data.astype(np.float32) / 32768, w.getframerate()
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        rate = stream.codec_context.sample_rate
    data = np.concatenate(frames, axis=1)  # planar float (2, n)
    return data.T.astype(np.float32), rate


# -- the timeline ------------------------------------------------------------------------


def test_chunks_a_little_off_their_time_are_contiguous_and_a_gap_is_silence():
    timeline = StereoTimeline(RATE)
    first, second = tone(0.08), tone(0.08, 880)
    timeline.add(LEFT, 0.0, first)
    timeline.add(LEFT, 0.083, second)  # 3 ms late: stamped when the loop got to it
    timeline.add(LEFT, 0.5, first)  # 340 ms later than the audio before it ends: a gap
    timeline.add(RIGHT, 0.2, second)
    frames = run(timeline, 1.0)
    assert frames.shape == (16000, 2)
    left, right = frames[:, 0], frames[:, 1]
    assert np.array_equal(left[:1280], first) and np.array_equal(left[1280:2560], second)
    assert not left[2560:8000].any() and np.array_equal(left[8000:9280], first) and not left[9280:].any()
    assert not right[:3200].any() and np.array_equal(right[3200:4480], second)
    assert timeline.gaps == 1


def test_audio_too_late_for_its_place_is_dropped_and_counted():
    timeline = StereoTimeline(RATE)
    timeline.add(RIGHT, 0.0, tone(1.0))
    timeline.add(RIGHT, 0.3, tone(0.08))  # 700 ms before the channel's end: its place is taken
    assert timeline.dropped_samples == 1280
    assert len(run(timeline, 1.0)) == 16000


def test_a_silent_channel_is_filled_so_memory_stays_bounded():
    timeline = StereoTimeline(RATE, max_skew=1.0)
    emitted = 0
    for k in range(50):  # 4 s of caller audio, nothing from the model
        timeline.add(LEFT, k * 0.08, tone(0.08))
        emitted += len(timeline.blocks())
    assert emitted >= 3 * RATE - 1280 and timeline.channels[LEFT].length <= RATE + 1280
    timeline.add(RIGHT, 3.9, tone(0.08))  # the model's first frame lands at its own time
    frames = run(timeline, 4.0)
    assert np.array_equal(frames[round(3.9 * RATE) - emitted :][:1280, 1], tone(0.08))


def test_pauses_are_silence_exactly_over_their_span_and_the_length_is_kept():
    timeline = StereoTimeline(RATE)
    pieces = []
    for k in range(40):  # 3.2 s, both channels full
        timeline.add(LEFT, k * 0.08, tone(0.08))
        timeline.add(RIGHT, k * 0.08, tone(0.08, 660))
        if k == 10:
            timeline.pause(0.8125)
        if k == 25:
            timeline.resume(2.03125)
        pieces.append(timeline.blocks())
    pieces.append(timeline.finish(3.2))
    frames = np.concatenate(pieces)
    assert frames.shape == (round(3.2 * RATE), 2)
    start, end = round(0.8125 * RATE), round(2.03125 * RATE)
    assert not frames[start:end].any()
    assert frames[start - 100 : start].all() and frames[end : end + 100].any(axis=0).all()
    assert timeline.pause_spans() == [(0.8125, 2.03125)]


def test_a_burst_laid_past_now_is_not_written_before_a_pause_that_follows_it():
    """Chunks that come in a burst (the loop was held up) are laid end to end, so they reach
    past the call's present. Emitted at once, the part past "now" escaped a pause that came
    next (seen in a CI run: 214 ms of sound at the start of a paused span); the timeline
    now writes only up to the latest call time it was told of."""
    timeline = StereoTimeline(RATE)
    pieces = []
    for k in range(10):  # in time, both channels
        timeline.add(LEFT, k * 0.08, tone(0.08))
        timeline.add(RIGHT, k * 0.08, tone(0.08, 660))
        timeline.reached((k + 1) * 0.08)
        pieces.append(timeline.blocks())
    for _ in range(3):  # a burst, all stamped at 0.8 s: laid out to 1.04 s
        timeline.add(LEFT, 0.8, tone(0.08))
        timeline.add(RIGHT, 0.8, tone(0.08, 660))
    timeline.reached(0.8)
    pieces.append(timeline.blocks())
    timeline.pause(0.8)
    pieces.append(timeline.finish(1.2))
    frames = np.concatenate(pieces)
    assert frames.shape == (round(1.2 * RATE), 2)
    # both channels have sound up to the pause, and nothing after it
    assert np.abs(frames[round(0.7 * RATE) : round(0.8 * RATE)]).max(axis=0).min() > 4000
    assert not frames[round(0.8 * RATE) :].any()


def test_finish_cuts_or_fills_to_the_calls_duration():
    timeline = StereoTimeline(RATE)
    timeline.add(LEFT, 0.0, tone(2.0))
    assert len(run(timeline, 1.5)) == 24000
    timeline = StereoTimeline(RATE)
    timeline.add(LEFT, 0.0, tone(0.5))
    frames = run(timeline, 2.0)
    assert len(frames) == 32000 and not frames[8000:].any()


# -- files -------------------------------------------------------------------------------


def test_opus_in_ogg_keeps_the_exact_length(tmp_path):
    path = tmp_path / "x.ogg"
    encoder = OggOpusEncoder(path, RATE)
    left, right = tone(1.2345), tone(1.2345, 880)
    encoder.write(np.stack([left, right], axis=1)[:5000])
    encoder.write(np.stack([left, right], axis=1)[5000:])
    encoder.close()
    frames, rate = decode(path)
    assert rate == 48000 and len(frames) == round(1.2345 * 48000)
    assert path.stat().st_size < 1.2345 * 32000 / 8 + 4096  # ~32 kbit/s, and the Ogg and Opus headers


@pytest.mark.parametrize("fmt", ["wav", "ogg"])
async def test_the_writer_thread_makes_the_file_and_the_storage_keeps_it(tmp_path, fmt):
    storage = LocalStorage(tmp_path / "recordings")
    writer = RecordingWriter(storage)
    writer.start()
    try:
        handle = writer.open("c-0123456789abcdef", fmt, time.time())
        caller8k = tone(3.0, 300, rate=8000)
        for k in range(0, len(caller8k), 640):  # 80 ms chunks at 8 kHz, as a G.711 call's tap gives
            assert handle.audio(LEFT, k / 8000, caller8k[k : k + 640], 8000)
        agent24k = tone(2.0, 500, rate=24000)
        for k in range(0, len(agent24k), 1920):  # the model's 80 ms frames, from 1 s on
            handle.audio(RIGHT, 1.0 + k / 24000, agent24k[k : k + 1920], 24000)
        result = await asyncio.wait_for(handle.finish(3.0), 30)
    finally:
        await writer.close()
    assert result.error is None and result.location is not None
    path = Path(result.location.removeprefix("file://"))
    assert path.parent.parent == (tmp_path / "recordings").resolve() and path.name == f"c-0123456789abcdef.{fmt}"
    assert result.bytes == (await asyncio.to_thread(path.stat)).st_size and result.duration_s == 3.0
    assert list((tmp_path / "recordings" / ".partial").iterdir()) == []
    frames, rate = decode(path)
    assert len(frames) == 3 * rate
    left, right = frames[:, 0], frames[:, 1]
    second = rate  # right: silence for 1 s, then the agent's tone
    assert np.sqrt(np.mean(right[: second - rate // 20] ** 2)) < 0.002
    assert np.sqrt(np.mean(right[second + rate // 10 :] ** 2)) > 0.1
    assert np.sqrt(np.mean(left**2)) > 0.1
    spectrum = np.abs(np.fft.rfft(left[rate // 2 : rate // 2 + rate]))
    assert abs(np.argmax(spectrum) - 300) <= 2  # the caller's 300 Hz, resampled, not another sound


async def test_a_full_queue_drops_audio_counts_it_and_keeps_the_length(tmp_path):
    dropped: list[float] = []
    writer = RecordingWriter(LocalStorage(tmp_path), max_queued_bytes=4000, on_dropped=dropped.append)
    handle = writer.open("c-aaaaaaaaaaaaaaaa", "wav", time.time())  # the thread is not started: nothing drains
    assert handle.audio(LEFT, 0.0, tone(0.1), RATE)  # 3200 bytes
    assert not handle.audio(LEFT, 0.1, tone(0.1), RATE)
    assert dropped == [pytest.approx(0.1)] and handle.dropped_seconds == pytest.approx(0.1)
    writer.start()
    result = await asyncio.wait_for(handle.finish(0.3), 30)
    await writer.close()
    frames, _ = decode(Path(result.location.removeprefix("file://")))
    assert len(frames) == round(0.3 * RATE) and not frames[1600:].any()


# -- the local directory -------------------------------------------------------------------


def test_local_storage_serves_only_its_own_files_and_sweeps_old_ones(tmp_path):
    storage = LocalStorage(tmp_path / "rec")
    made = storage.spool / "c-1.wav"
    made.write_bytes(b"RIFF....")
    stored = storage.put(made, storage.key("c-1", "wav", time.time()))
    size, chunks = storage.open(stored.location)
    assert size == 8 and b"".join(chunks) == b"RIFF...."
    outside = tmp_path / "secret.txt"
    outside.write_text("not a recording")
    for location in (
        outside.as_uri(),
        (tmp_path / "rec" / ".." / "secret.txt").as_uri(),
        "s3://b/k",
        (storage.spool / "x.wav").as_uri(),
    ):
        with pytest.raises(NotStored):
            storage.open(location)
    old = storage.put(_file(storage.spool / "c-2.ogg"), storage.key("c-2", "ogg", time.time() - 86400 * 8))
    path = Path(old.location.removeprefix("file://"))
    os.utime(path, (time.time() - 86400 * 8, time.time() - 86400 * 8))
    assert storage.sweep(time.time() - 86400 * 7) == 1
    assert not path.exists() and not path.parent.exists()  # its day's directory went with it
    with pytest.raises(NotStored, match="not on this gateway's disk"):
        storage.open(old.location)
    assert storage.open(stored.location)[0] == 8


def _file(path: Path) -> Path:
    path.write_bytes(b"OggS")
    return path
