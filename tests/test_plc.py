"""Packet loss concealment: continuation of the pitch, the fade-out shape, the smooth resume."""

from __future__ import annotations

import numpy as np
import pytest

from sip.plc import PacketLossConcealer

RATE = 8000
FRAME = 160


def voiced(samples: int, start: int = 0, period: int = 64) -> np.ndarray:
    """A 125 Hz voice-like waveform: fundamental plus two harmonics, period ``period``."""
    n = np.arange(start, start + samples)
    phase = 2 * np.pi * n / period
    return (6000 * np.sin(phase) + 3000 * np.sin(2 * phase + 0.5) + 1500 * np.sin(3 * phase + 1.0)).astype(np.int16)


def warm(plc: PacketLossConcealer, frames: int = 5, period: int = 64) -> int:
    for i in range(frames):
        plc.good(voiced(FRAME, i * FRAME, period))
    return frames * FRAME


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_without_history_concealment_is_silence() -> None:
    out = PacketLossConcealer().conceal(FRAME)
    assert out.dtype == np.int16 and len(out) == FRAME and not out.any()


@pytest.mark.parametrize("period", [48, 64, 100])
def test_concealment_continues_the_waveform_at_its_pitch(period: int) -> None:
    plc = PacketLossConcealer()
    played = warm(plc, period=period)
    out = plc.conceal(FRAME)
    truth = voiced(FRAME, played, period)
    first_10ms = slice(0, 80)
    # same phase and level as the lost audio while at full level
    correlation = np.corrcoef(out[first_10ms].astype(float), truth[first_10ms].astype(float))[0, 1]
    assert correlation > 0.95
    assert rms(out[first_10ms]) == pytest.approx(rms(truth[first_10ms]), rel=0.1)


def test_fades_to_silence_after_60_ms() -> None:
    plc = PacketLossConcealer()
    played = warm(plc)
    level = rms(voiced(FRAME, played))
    frames = [plc.conceal(FRAME) for _ in range(5)]
    levels = [rms(f) for f in frames]
    assert levels[0] > 0.7 * level  # first 20 ms: full for 10 ms, then starting to fade
    assert levels[0] > levels[1] > levels[2] > 0  # attenuation grows with consecutive losses
    assert not frames[3].any() and not frames[4].any()  # silent from 60 ms on
    # the peak of each pitch period (64 samples) never rises
    peaks = np.abs(np.concatenate(frames[:3]).astype(float))[:448].reshape(-1, 64).max(axis=1)
    assert np.all(np.diff(peaks) <= 1.0)
    assert plc.frames_concealed == 5


def test_resume_cross_fades_instead_of_jumping() -> None:
    plc = PacketLossConcealer()
    played = warm(plc)
    concealed = plc.conceal(FRAME)
    resumed_input = -voiced(FRAME, played + FRAME)  # deliberately out of phase with the concealment
    resumed = plc.good(resumed_input)
    # the first sample stays near the concealment's next value, not the new signal's
    jump_raw = abs(int(resumed_input[0]) - int(concealed[-1]))
    jump_smoothed = abs(int(resumed[0]) - int(concealed[-1]))
    assert jump_smoothed < jump_raw / 2
    # after the cross-fade the frame is the real audio, untouched
    assert np.array_equal(resumed[80:], resumed_input[80:])
    assert not plc.in_loss
    # a frame after a clean one is passed through unchanged
    again = voiced(FRAME, played + 2 * FRAME)
    assert plc.good(again) is again


def test_resume_after_long_loss_fades_in_from_silence() -> None:
    plc = PacketLossConcealer()
    warm(plc)
    for _ in range(5):
        plc.conceal(FRAME)
    loud = np.full(FRAME, 10000, dtype=np.int16)
    resumed = plc.good(loud)
    assert 0 < resumed[0] < 500  # starts near silence
    assert np.all(np.diff(resumed[:80].astype(int)) >= 0)  # rises monotonically
    assert resumed[-1] == 10000


def test_works_for_10_and_40_ms_frames() -> None:
    for frame in (80, 320):
        plc = PacketLossConcealer()
        for i in range(8):
            plc.good(voiced(frame, i * frame))
        out = plc.conceal(frame)
        assert len(out) == frame and out.dtype == np.int16 and out.any()
