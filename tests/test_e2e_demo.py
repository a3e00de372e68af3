"""A SIP call reaches the model (the tiny random demo Moshi, loaded through the real loader)
and the model's audio comes back at 50 packets a second without gaps."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from service.settings import CallSettings
from service.tools.call import place_call
from tests.support.realtime import realtime_test
from tests.support.services import wait_until
from tests.test_e2e_echo import tone_wav


@realtime_test()
async def test_sip_call_reaches_the_model_and_its_audio_returns_steadily(demo_gateway, tmp_path, timing):
    settings = CallSettings(
        uri=demo_gateway.uri,
        play=str(tone_wav(tmp_path / "in.wav", 6.0)),
        record=str(tmp_path / "out.wav"),
        seconds=6.0,
        local_host="127.0.0.1",
    )
    summary = await place_call(settings)
    arrivals = summary["arrivals"]
    assert arrivals["packets_per_second"] > 25, arrivals  # the model's audio flowed all call long
    timing.expect(arrivals["packets_per_second"] == pytest.approx(50, abs=1.0), f"50 packets/s: {arrivals}")
    timing.expect(arrivals["sequence_gaps"] == 0, f"no gap: {arrivals}")
    timing.expect(arrivals["spacing_max_ms"] < 80, f"no stall on the way back: {arrivals}")
    timing.expect(summary["packets_lost"] == 0, f"nothing lost: {summary['packets_lost']}")

    call_id = summary["gateway_call_id"]
    status, detail = wait_until(
        lambda: (r := demo_gateway.get(f"/v1/calls/{call_id}"))[0] == 200 and r[1].get("state") == "ended" and r,
        10,
        "the call record",
    )
    quality = detail["quality"]
    # one 80 ms model frame per step for the whole call: ~6 s / 80 ms
    assert quality["model_frames"] >= 30, quality
    timing.expect(quality["model_frames"] >= 60, f"a model frame every 80 ms: {quality}")
    timing.expect(
        quality["model_packets"] >= 4 * (quality["model_frames"] - 2) * 0.9,
        f"four packets sent per model frame: {quality}",
    )
    # what came back is the model's voice (the demo babbles), not silence
    with wave.open(summary["recording"]) as rec:
        model = np.frombuffer(rec.readframes(rec.getnframes()), "<i2").reshape(-1, 2)[:, 1]
    assert np.sqrt(np.mean(model.astype(np.float64) ** 2)) > 100
