"""The call's record beyond the agent's words, through a real gateway's lifecycle, API and
Redis (the media taps fed in real time, as an edge feeds them): the recording and its
scope, pause and resume, the webhook's location, retention, DTMF masking."""

from __future__ import annotations

import asyncio
import json
import time
import typing as tp
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.gateway.calls.call import Call
from service.gateway.media.pipeline import CallerAudio
from service.wire import FRAME_SAMPLES
from sip.dtmf import DtmfDigit
from sip.identity import CallerIdentity
from tests.support.api import ADMIN, READ, RECORDINGS, ApiGateway, api_gateway
from tests.support.http_sink import HttpSink
from tests.support.polling import eventually
from tests.test_recording import decode

CALLER_RATE = 8000


def caller_tone(k: int) -> np.ndarray:
    """80 ms of a 300 Hz caller tone at 8 kHz, chunk ``k``."""
    n = np.arange(k * 640, (k + 1) * 640)
    return (np.sin(2 * np.pi * 300 * n / CALLER_RATE) * 8000).astype(np.int16)


def agent_frame(k: int) -> bytes:
    n = np.arange(k * FRAME_SAMPLES, (k + 1) * FRAME_SAMPLES)
    return (np.sin(2 * np.pi * 700 * n / 24000) * 6000).astype("<i2").tobytes()


async def talk(call: Call, seconds: float, *, during: dict[int, tp.Any] | None = None) -> None:
    """Both sides on the call's taps in real time: the caller's 80 ms chunks, the model's
    frames; ``during[k]`` is awaited after chunk ``k``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for k in range(round(seconds / 0.08)):
        await asyncio.sleep(max(0.0, start + (k + 1) * 0.08 - loop.time()))
        call.pipeline.taps.caller.emit(CallerAudio(caller_tone(k), CALLER_RATE))
        call.pipeline.from_model(agent_frame(k))
        if during and k in during:
            await during[k]()


async def recording_of(api: ApiGateway, call: Call) -> dict:
    async def stored() -> bool:
        async with httpx.AsyncClient() as client:
            info = (await client.get(f"{api.base}/v1/calls/{call.id}", headers=READ)).json()
        return (info.get("recording") or {}).get("state") in ("stored", "failed")

    await eventually(stored, timeout=30, what="the recording stored")
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{api.base}/v1/calls/{call.id}", headers=READ)).json()


@pytest.mark.parametrize("fmt", ["wav", "ogg"])
async def test_a_recorded_call_is_served_to_the_recordings_scope_and_its_location_is_in_the_webhook(
    redis_server, tmp_path, fmt
):
    with HttpSink() as sink:
        async with api_gateway(
            redis_server.url, recording=fmt, recording_dir=str(tmp_path / "rec"), webhook_url=sink.url
        ) as api:
            call = api.start_call()
            async with httpx.AsyncClient() as client:
                live = (await client.get(f"{api.base}/v1/calls/{call.id}", headers=READ)).json()
                assert live["recording"] == {
                    "format": fmt,
                    "state": "recording",
                    "pauses": [],
                    "location": None,
                    "bytes": None,
                    "duration_s": None,
                    "dropped_s": None,
                    "error": None,
                }
                early = await client.get(f"{api.base}/v1/calls/{call.id}/recording", headers=RECORDINGS)
                assert early.status_code == 409 and "not stored yet" in early.json()["detail"]
            await talk(call, 2.0)
            await api.hang_up(call)
            info = await recording_of(api, call)
            async with httpx.AsyncClient() as client:
                refused = await client.get(f"{api.base}/v1/calls/{call.id}/recording", headers=READ)
                served = await client.get(f"{api.base}/v1/calls/{call.id}/recording", headers=RECORDINGS)
                by_admin = await client.get(f"{api.base}/v1/calls/{call.id}/recording", headers=ADMIN)
                unknown = await client.get(f"{api.base}/v1/calls/c-0000000000000000/recording", headers=ADMIN)
            [hook] = await asyncio.to_thread(sink.wait_for, 1)
    recording = info["recording"]
    assert recording["state"] == "stored" and recording["duration_s"] == info["duration_s"]
    assert (
        recording["location"]
        == (tmp_path / "rec").resolve().as_uri() + f"/{time.strftime('%Y-%m-%d', time.gmtime())}/{call.id}.{fmt}"
    )
    assert refused.status_code == 403 and "recordings" in refused.json()["detail"]
    assert served.status_code == 200 and by_admin.content == served.content
    assert served.headers["content-type"] == {"wav": "audio/wav", "ogg": "audio/ogg"}[fmt]
    assert int(served.headers["content-length"]) == len(served.content) == recording["bytes"]
    assert unknown.status_code == 404
    (tmp_path / f"got.{fmt}").write_bytes(served.content)
    frames, rate = decode(tmp_path / f"got.{fmt}")
    assert abs(len(frames) / rate - info["duration_s"]) < 0.01
    left, right = frames[:, 0], frames[:, 1]
    for channel, freq in ((left, 300), (right, 700)):  # each side on its own channel
        spectrum = np.abs(np.fft.rfft(channel[rate // 2 : rate // 2 + rate]))
        assert abs(np.argmax(spectrum) - freq) <= 3
    body = json.loads(hook.body)
    assert body["record"]["recording"]["location"] == recording["location"]
    assert body["record"]["recording"]["state"] == "stored"


async def test_pause_and_resume_leave_silence_exactly_over_the_paused_span(redis_server, tmp_path):
    async with api_gateway(
        redis_server.url, recording="wav", recording_dir=str(tmp_path / "rec"), transcription=False
    ) as api:
        call = api.start_call()
        answers: dict[str, httpx.Response] = {}

        async def post(name: str, path: str, headers: dict) -> None:
            async with httpx.AsyncClient() as client:
                answers[name] = await client.post(f"{api.base}/v1/calls/{call.id}/recording/{path}", headers=headers)

        async def refused() -> None:
            await post("read", "pause", READ)
            await post("recordings", "pause", RECORDINGS)

        async def pause() -> None:
            await post("pause", "pause", ADMIN)
            await post("again", "pause", ADMIN)

        async def resume() -> None:
            await post("resume", "resume", ADMIN)
            await post("resume-again", "resume", ADMIN)

        await talk(call, 3.0, during={4: refused, 10: pause, 24: resume})
        await api.hang_up(call)
        info = await recording_of(api, call)
        await api.settle()
        async with httpx.AsyncClient() as client:
            served = await client.get(f"{api.base}/v1/calls/{call.id}/recording", headers=RECORDINGS)
            transcript = (await client.get(f"{api.base}/v1/calls/{call.id}/transcript", headers=READ)).json()
    assert answers["read"].status_code == 403 and answers["recordings"].status_code == 403  # admin only
    assert answers["pause"].status_code == 202 and answers["pause"].json()["state"] == "paused"
    assert answers["again"].status_code == 409 and "paused already" in answers["again"].json()["detail"]
    assert answers["resume"].status_code == 202 and answers["resume-again"].status_code == 409
    start, end = answers["pause"].json()["at"], answers["resume"].json()["at"]
    assert 0.85 < start < 1.2 and 1.95 < end < 2.4  # after chunks 10 and 24
    assert info["recording"]["pauses"] == [{"start": start, "end": end}]
    notes = [(e["t"], e["text"]) for e in transcript["events"] if e["kind"] == "note"]
    assert notes == [(start, "recording paused"), (end, "recording resumed")]
    (tmp_path / "got.wav").write_bytes(served.content)
    frames, rate = decode(tmp_path / "got.wav")
    assert abs(len(frames) / rate - info["duration_s"]) < 0.01
    first, last = round(start * rate), round(end * rate)
    assert not frames[first:last].any(), _debug(frames, first, last)  # both channels, exactly the span
    assert np.abs(frames[first - rate // 10 : first - rate // 20, 0]).max() > 0.1  # the caller, up to the pause
    assert np.abs(frames[last + rate // 20 : last + rate // 5, 0]).max() > 0.1  # and again from the resume


async def test_a_pause_keeps_the_agents_words_and_digits_out_of_the_transcript_too(redis_server):
    """A call that is not recorded still has a transcript: a pause keeps the card number
    out of it (the agent's words, DTMF in clear), and marks the span."""
    async with api_gateway(redis_server.url, dtmf_clear=True, transcription=False) as api:
        call = api.start_call()
        call._on_text("ご用件を", 0.0)
        async with httpx.AsyncClient() as client:
            paused = await client.post(f"{api.base}/v1/calls/{call.id}/recording/pause", headers=ADMIN)
            call._on_text("4111", 0.0)
            call.pipeline.taps.dtmf.emit(DtmfDigit("4", 4, 120.0, 10, 0, "end"))
            resumed = await client.post(f"{api.base}/v1/calls/{call.id}/recording/resume", headers=ADMIN)
            call._on_text("ありがとうございます", 0.0)
            call.pipeline.taps.dtmf.emit(DtmfDigit("5", 5, 120.0, 10, 0, "end"))
            missing = await client.get(f"{api.base}/v1/calls/{call.id}/recording", headers=RECORDINGS)
    assert paused.status_code == 202 and resumed.status_code == 202
    assert [(e.kind, e.text) for e in call.transcript] == [
        ("agent", "ご用件を"),
        ("note", "recording paused"),
        ("dtmf", "*"),
        ("note", "recording resumed"),
        ("agent", "ありがとうございます"),
        ("dtmf", "5"),
    ]
    assert missing.status_code == 404 and "not recorded" in missing.json()["detail"]


async def test_a_recording_goes_with_its_call_record_at_the_end_of_the_retention(redis_server, tmp_path):
    async with api_gateway(
        redis_server.url,
        recording="ogg",
        recording_dir=str(tmp_path / "rec"),
        call_retention_seconds=3.0,
        transcription=False,
    ) as api:
        call = api.start_call()
        await talk(call, 0.5)
        await api.hang_up(call)
        info = await recording_of(api, call)
        path = Path(info["recording"]["location"].removeprefix("file://"))
        assert await asyncio.to_thread(path.exists)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{api.base}/v1/calls/{call.id}/recording", headers=RECORDINGS)).status_code == 200
        await eventually(lambda: not path.exists(), timeout=10, what="the recording deleted")
        async with httpx.AsyncClient() as client:
            gone = await client.get(f"{api.base}/v1/calls/{call.id}/recording", headers=RECORDINGS)
        assert gone.status_code == 404


@pytest.mark.parametrize("clear", [False, True])
async def test_dtmf_is_masked_in_the_transcript_api_and_webhook_unless_the_route_says_clear(redis_server, clear):
    with HttpSink() as sink:
        async with api_gateway(redis_server.url, webhook_url=sink.url, dtmf_clear=clear, transcription=False) as api:
            call = api.start_call()
            for digit in "4111":
                call.pipeline.taps.dtmf.emit(DtmfDigit(digit, int(digit), 120.0, 10, 0, "end"))
            live = [e.text for e in call.transcript]
            await api.hang_up(call)
            await api.settle()
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"{api.base}/v1/calls/{call.id}/transcript?format=text", headers=READ)).text
            [hook] = await asyncio.to_thread(sink.wait_for, 1)
        stored = await api.gateway.transcript_store.read(call.id)
    expected = list("4111") if clear else ["*"] * 4
    assert live == expected
    assert [event.text for _, event in stored.pieces] == expected  # Redis holds no digit in clear
    assert [e["text"] for e in json.loads(hook.body)["transcript"]["events"]] == expected
    assert ("DTMF: 4 (120 ms)" in text) is clear and ("DTMF: * (120 ms)" in text) is not clear


async def test_a_route_chooses_what_its_calls_record_and_the_gateways_settings_fill_in_the_rest(redis_server, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "unmatched: plain\nroutes:\n"
        "  - name: cards\n    match: {number: [cards]}\n"
        "    recording: {format: wav, human_part: false}\n    dtmf_clear: true\n"
        "  - name: plain\n"
    )
    async with api_gateway(
        redis_server.url,
        routes=str(routes),
        recording="off",
        recording_dir=str(tmp_path / "rec"),
        transcription=False,
        recording_transfer=True,
    ) as api:
        cards = api.start_call(identity=CallerIdentity(dialled="cards"))
        plain = api.start_call(identity=CallerIdentity(dialled="other"))
        for call in (cards, plain):
            call.pipeline.taps.dtmf.emit(DtmfDigit("7", 7, 120.0, 10, 0, "end"))
        policies = {call.record.route: call.policy for call in (cards, plain)}
        await talk(cards, 1.0)
        await api.hang_up(cards)
        await api.hang_up(plain)
        info = await recording_of(api, cards)
        async with httpx.AsyncClient() as client:
            other = (await client.get(f"{api.base}/v1/calls/{plain.id}", headers=READ)).json()
    assert (policies["cards"].recording, policies["cards"].recording_transfer, policies["cards"].dtmf_clear) == (
        "wav",
        False,
        True,
    )
    assert (policies["plain"].recording, policies["plain"].recording_transfer, policies["plain"].dtmf_clear) == (
        "off",
        True,
        False,
    )
    assert info["recording"]["state"] == "stored" and other["recording"] is None
    assert [e.text for e in cards.transcript if e.kind == "dtmf"] == ["7"]
    assert [e.text for e in plain.transcript if e.kind == "dtmf"] == ["*"]


def _debug(frames, first, last):
    nz = np.flatnonzero(frames[first:last].any(axis=1))
    return first, last, nz[:5] + first, nz[-5:] + first, len(nz)


def test_settings_that_cannot_work_stop_the_gateway_naming_them(tmp_path):
    from service.config import ConfigError, load
    from service.gateway.main import Gateway
    from service.settings import GatewaySettings
    from tests.support.api import gateway_settings

    not_audio = tmp_path / "consent.wav"
    not_audio.write_text("this is not a WAV file")
    with pytest.raises(ConfigError, match="MOSHIMOSHI_CONSENT_ANNOUNCEMENT=.*not a readable WAV"):
        Gateway(gateway_settings(None, worker_url="echo:", consent_announcement=str(not_audio)))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="MOSHIMOSHI_RECORDING_DIR="):
        Gateway(gateway_settings(None, worker_url="echo:", recording="wav", recording_dir=str(a_file / "sub")))
    with pytest.raises(ConfigError, match="MOSHIMOSHI_RECORDING"):
        load(GatewaySettings, environ={"MOSHIMOSHI_RECORDING": "mp3"})
    with pytest.raises(ConfigError, match="MOSHIMOSHI_RECORDING_S3_ENDPOINT_URL"):
        load(GatewaySettings, environ={"MOSHIMOSHI_RECORDING_S3_ENDPOINT_URL": "minio:9000"})
    with pytest.raises(ConfigError, match="MOSHIMOSHI_ASR_URL"):
        load(GatewaySettings, environ={"MOSHIMOSHI_ASR_URL": "http://asr:8082"})


def test_the_announcement_takes_the_place_of_the_models_first_frames():
    from service.gateway.media.pipeline import MediaPipeline

    class Edge:  # what reaches the caller
        def __init__(self) -> None:
            self.frames: list[bytes] = []

        def from_model(self, frame: bytes) -> None:
            self.frames.append(frame)

    pipeline = MediaPipeline(to_model=lambda frame: None)
    heard: list[bytes] = []
    pipeline.taps.agent.attach(heard.append)
    played: list[int] = []
    pipeline.on_announced = lambda: played.append(len(heard))
    announcement = [bytes([k]) * 3840 for k in range(1, 4)]
    pipeline.announce(announcement)
    model = [bytes([100 + k]) * 3840 for k in range(6)]
    pipeline.from_model(model[0])  # before the answer: no edge, nothing replaced or heard
    edge = Edge()
    pipeline.attach_edge(edge)  # type: ignore[arg-type]
    for frame in model[1:]:
        pipeline.from_model(frame)
    assert edge.frames == [*announcement, model[4], model[5]]
    assert heard == [model[0], *announcement, model[4], model[5]]  # the agent tap: what was sent
    assert played == [3] and pipeline.held_back_frames == 3 and not pipeline.announcing  # as the last one goes


def test_an_announcement_file_becomes_80_ms_frames_at_24_khz(tmp_path):
    import wave

    from service.gateway.media.announcement import load_announcement

    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(np.zeros((8000 + 100, 2), "<i2").tobytes())  # 1.0125 s of stereo at 8 kHz
    frames = load_announcement(path)
    assert len(frames) == 13 and all(len(f) == FRAME_SAMPLES * 2 for f in frames)
    with pytest.raises(ValueError, match="not a readable WAV"):
        load_announcement(tmp_path / "missing.wav")
