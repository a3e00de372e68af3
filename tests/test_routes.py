"""Routes (service/gateway/routes): the file checked with errors that name their line,
numbers matched in E.164 and national forms, trunks, limits, reloads that keep the routes
in force when the new file is bad, and the prompts routes name."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

from service.gateway.media.prompts import PromptPlayer, tone, wav_prompt
from service.gateway.routes.numbers import NumberPlan
from service.gateway.routes.schema import RoutesError
from service.gateway.routes.table import RouteTable, Trunk, load_file
from service.wire import FRAME_BYTES, SAMPLE_RATE

EXAMPLE = """\
country_code: "81"
unmatched: reject
routes:
  - name: support
    match:
      number: ["03-1234-5678", "+81501111222"]
    model: llm-jp/llm-jp-moshi-v1
    fallback: sip:queue@pbx.example
    dtmf: {"0": transfer, "9": hangup, "#": {action: transfer, target: "tel:+81312340000"}}
    announcement: ringback
    overflow: {action: message, message: busy.wav}
    max_call_seconds: 600
    max_calls: 2
    sampling: {temp: 0.6, top_k: 100}
    recording: {format: ogg, human_part: true}
    transcription: true
    consent_announcement: busy.wav
  - name: research
    match: {prefix: "0120", source: 10.0.0.0/8}
    model: nu-dialogue/j-moshi-ext
    recording: off
  - name: pattern
    match: {pattern: '\\+8180\\d{8}'}
  - name: agent
    match: {number: agent}
"""


def write_wav(path: Path, seconds: float = 0.5, rate: int = 8000, freq: float = 440.0) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def routes_dir(tmp_path: Path) -> Path:
    write_wav(tmp_path / "busy.wav")
    return tmp_path


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def error_of(directory: Path, text: str, **kwargs) -> RoutesError:
    with pytest.raises(RoutesError) as caught:
        load_file(write(directory / "routes.yaml", text), digest_users=kwargs.get("digest_users", False))
    return caught.value


def test_numbers_national_and_e164_are_one_number():
    plan = NumberPlan()
    assert plan.canonical("0312345678") == plan.canonical("+81312345678") == "+81312345678"
    assert plan.canonical("03-1234-5678") == "+81312345678"
    assert plan.canonical("(03) 1234.5678") == "+81312345678"
    assert plan.canonical("010 1 212 555 0100") == "+12125550100"
    assert plan.canonical("110") == "110"  # a short code stays as dialled
    assert plan.canonical("Agent") == "agent"
    assert (
        NumberPlan(country_code="1", national_prefix="1", international_prefix="011").canonical("12125550100")
        == "+12125550100"
    )


def test_the_example_file_reads_with_every_field(routes_dir):
    loaded = load_file(write(routes_dir / "routes.yaml", EXAMPLE), digest_users=False)
    routes = loaded.routes
    support = routes.named("support")
    assert support is not None
    assert support.match.numbers == {"+81312345678", "+81501111222"}
    assert support.model == "llm-jp/llm-jp-moshi-v1"
    assert support.dtmf["0"].action == "transfer" and support.dtmf["9"].action == "hangup"
    assert support.transfer_target(support.dtmf["0"].target) == "sip:queue@pbx.example"
    assert support.dtmf["#"].target == "tel:+81312340000"
    assert support.overflow.action == "message" and support.overflow.message is not None
    assert support.overflow.message.name == str(routes_dir / "busy.wav")
    assert (support.max_call_seconds, support.max_calls) == (600.0, 2)
    assert support.sampling == {"temp": 0.6, "top_k": 100}
    assert support.recording.format == "ogg" and support.recording.human_part
    assert support.transcription and not support.dtmf_clear
    assert routes.named("research").recording.format == "off"  # a bare YAML off is "off"
    assert routes.unmatched is None
    # every prompt named was made at load
    assert support.announcement in loaded.prompts and support.overflow.message in loaded.prompts


def test_routes_match_by_number_prefix_pattern_and_trunk(routes_dir):
    table = RouteTable(load_file(write(routes_dir / "routes.yaml", EXAMPLE), digest_users=False))
    assert table.resolve("0312345678").name == "support"
    assert table.resolve("+81312345678").name == "support"
    assert table.resolve("0501111222").name == "support"
    assert table.resolve("0120123456", Trunk(source="10.1.2.3")).name == "research"
    assert table.resolve("0120123456", Trunk(source="192.0.2.1")) is None  # the trunk does not fit: 404
    assert table.resolve("08012345678").name == "pattern"
    assert table.resolve("0801234567") is None  # the pattern must match the whole number
    assert table.resolve("agent").name == "agent"
    assert table.resolve("0399999999") is None


def test_unmatched_numbers_may_take_a_route(routes_dir):
    text = EXAMPLE.replace("unmatched: reject", "unmatched: agent")
    table = RouteTable(load_file(write(routes_dir / "routes.yaml", text), digest_users=False))
    assert table.resolve("0399999999").name == "agent"
    assert table.for_webrtc().name == "agent"


def test_digest_user_matches_only_with_digest_authentication(routes_dir):
    text = "routes:\n  - name: trunk-a\n    match: {digest_user: carrier-a}\n"
    assert "needs digest authentication" in error_of(routes_dir, text).message
    table = RouteTable(load_file(write(routes_dir / "routes.yaml", text), digest_users=True))
    assert table.resolve("0312345678", Trunk(digest_user="carrier-a")).name == "trunk-a"
    assert table.resolve("0312345678", Trunk(digest_user="carrier-b")) is None


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("routes:\n  - name: a\n    modle: x\n", 3, "unknown key 'modle'"),
        ("routes:\n  - name: a\n  - name: a\n", 3, "used twice"),
        ('routes:\n  - name: a\n    dtmf: {"0": dial}\n', 3, "action must be one of transfer, hangup"),
        ('routes:\n  - name: a\n    dtmf: {"0": transfer}\n', 3, "no 'fallback'"),
        ('routes:\n  - name: a\n    dtmf: {"X": hangup}\n', 3, "not one of 0-9"),
        ("routes:\n  - name: a\n\n    match:\n      pattern: '(['\n", 5, "pattern '(['"),
        ("routes:\n  - name: a\n    max_calls: 0\n", 3, "'max_calls' must be a whole number"),
        ("routes:\n  - name: a\n    sampling: {temp: hot}\n", 3, "'temp' must be a number"),
        ("routes:\n  - name: a\n    recording: mp3\n", 3, "recording must be one of off, wav, ogg"),
        ("routes:\n  - name: a\n    announcement: missing.wav\n", 3, "No such file"),
        ("routes:\n  - name: a\n    overflow: {action: message}\n", 3, "needs the message"),
        ("routes:\n  - name: a\n    fallback: mailto:x@y\n", 3, "not a sip:, sips: or tel: URI"),
        ("routes:\n  - name: a\n    match: {source: 300.1.1.1}\n", 3, "not an IP address"),
        ("unmatched: nobody\nroutes:\n  - name: a\n", 1, "the name of a route"),
        ("routes:\n  - name: a b\n", 2, "'name' must be"),
        ("routes: [\n", 2, "expected"),
        ("routes:\n  - name: a\n    model: &m x\n  - name: b\n    model: *m\n", 5, "aliases"),
        ("routes:\n  - name: a\nroutes: []\n", 3, "given twice"),
        ("", 0, "empty"),
        ("routes: []\n", 1, "at least one route"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line(routes_dir, text, line, words):
    error = error_of(routes_dir, text)
    assert error.line == line, error
    assert words in error.message, error
    shown = error.where("routes.yaml")
    assert "\n" not in shown and shown.startswith(f"routes.yaml:{line}: " if line else "routes.yaml: ")


def test_a_wav_that_is_not_a_prompt_is_refused_naming_the_line(routes_dir):
    (routes_dir / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    error = error_of(routes_dir, "routes:\n  - name: a\n    announcement: bad.wav\n")
    assert error.line == 3 and "not a PCM WAV file" in error.message


async def test_a_reload_with_a_bad_file_keeps_the_routes_in_force(routes_dir, caplog):
    path = write(routes_dir / "routes.yaml", EXAMPLE)
    table = RouteTable.open(path)
    assert table.resolve("0312345678").model == "llm-jp/llm-jp-moshi-v1"
    write(routes_dir / "routes.yaml", EXAMPLE.replace("max_calls: 2", "max_calls: lots"))
    assert not await table.reload()
    assert table.resolve("0312345678").max_calls == 2
    assert any(f"{path}:13:" in record.getMessage() for record in caplog.records), caplog.text
    write(routes_dir / "routes.yaml", EXAMPLE.replace("model: llm-jp/llm-jp-moshi-v1", "model: echo"))
    assert await table.reload()
    assert table.resolve("0312345678").model == "echo"


async def test_the_file_is_watched_and_reloaded_when_it_changes(routes_dir):
    path = write(routes_dir / "routes.yaml", EXAMPLE)
    table = RouteTable.open(path)
    watcher = asyncio.create_task(table.watch(interval=0.05))
    try:
        write(routes_dir / "routes.yaml", EXAMPLE.replace("max_calls: 2", "max_calls: 5"))
        for _ in range(100):
            if table.resolve("0312345678").max_calls == 5:
                break
            await asyncio.sleep(0.05)
        assert table.resolve("0312345678").max_calls == 5
    finally:
        watcher.cancel()


def test_limits_count_calls_by_route_name_across_reloads(routes_dir):
    table = RouteTable(load_file(write(routes_dir / "routes.yaml", EXAMPLE), digest_users=False))
    support = table.named("support")
    assert table.admit(support) and table.admit(support)
    assert not table.admit(support)  # max_calls: 2
    table.loaded = load_file(write(routes_dir / "routes.yaml", EXAMPLE), digest_users=False)
    assert not table.admit(table.named("support"))  # the two calls still count after a reload
    table.release(support)
    assert table.admit(table.named("support"))


def test_without_a_file_every_number_takes_the_default_route():
    table = RouteTable.open(None, model="echo")
    route = table.resolve("anything")
    assert route.name == "default" and route.model == "echo"
    assert table.resolve("").name == "default" and table.for_webrtc().name == "default"
    assert not route.announcement.early_media  # a 180, as before routes existed
    assert table.prompt(route.announcement) is None


def test_ringback_tone_is_400_hz_one_second_in_three():
    prompt = tone("ringback")
    assert prompt.loop and abs(prompt.seconds - 3.0) < 0.1
    pcm = np.frombuffer(b"".join(prompt.frames), "<i2").astype(np.float64)
    on, off = pcm[:SAMPLE_RATE], pcm[int(1.1 * SAMPLE_RATE) : int(2.9 * SAMPLE_RATE)]
    spectrum = np.abs(np.fft.rfft(on))
    peak = np.fft.rfftfreq(len(on), 1 / SAMPLE_RATE)[spectrum.argmax()]
    assert 380 <= peak <= 420, peak
    assert np.abs(off).max() == 0


def test_a_wav_prompt_is_resampled_to_model_frames(tmp_path):
    prompt = wav_prompt(str(write_wav(tmp_path / "p.wav", seconds=1.0, rate=16000, freq=1000.0)))
    assert all(len(frame) == FRAME_BYTES for frame in prompt.frames)
    assert abs(prompt.seconds - 1.04) < 0.05 and not prompt.loop
    pcm = np.frombuffer(b"".join(prompt.frames), "<i2").astype(np.float64)[:SAMPLE_RATE]
    peak = np.fft.rfftfreq(len(pcm), 1 / SAMPLE_RATE)[np.abs(np.fft.rfft(pcm)).argmax()]
    assert abs(peak - 1000) < 5


async def test_a_prompt_player_plays_every_frame_once_then_stops(tmp_path):
    prompt = wav_prompt(str(write_wav(tmp_path / "p.wav", seconds=0.3)))
    frames: list[bytes] = []
    player = PromptPlayer(prompt, frames.append)
    player.start()
    await asyncio.wait_for(player.done.wait(), 5)
    assert frames == list(prompt.frames)


def test_routes_and_outbound_calls_are_documented_with_a_complete_example(tmp_path):
    """The README's example routes file is one the gateway reads."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "## Routes, transfer and outbound calls" in readme
    assert "POST /v1/calls" in readme and "--routes" in readme
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    for name in ("hold-music.wav", "busy.wav", "consent.wav"):
        write_wav(tmp_path / name)
    loaded = load_file(write(tmp_path / "routes.yaml", example), digest_users=True)
    assert len(loaded.routes.routes) >= 3
