"""A bridged transfer's packet-by-packet relay between two SIP legs (``CallMedia.start_relay``):
real RTP sessions on loopback, a caller and a person as plain UDP peers."""

from __future__ import annotations

import asyncio
import struct

import numpy as np

from service.gateway.media.rtp_media import CallMedia
from sip import codecs, g711
from sip.rtpsession import RtpSession
from tests.support.realtime import realtime_test
from tests.support.udp import UdpPeer, loopback_media, port_allocator

MODEL_HZ, PERSON_HZ, CALLER_HZ = 2000.0, 1000.0, 500.0


def tone(freq: float, rate: int, seconds: float, start: int = 0) -> np.ndarray:
    t = (start + np.arange(int(rate * seconds))) / rate
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def hz(pcm: np.ndarray, rate: int = 8000) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.argmax(spectrum) * rate / len(pcm))


async def leg(allocator, peer: UdpPeer) -> tuple[RtpSession, CallMedia]:
    rtp = await RtpSession.open(allocator, host="127.0.0.1")
    rtp.update_remote("127.0.0.1", peer.address[1])
    rtp.trust_ip("127.0.0.1")  # what the dialer does for the person it called: media may go there at once
    negotiated = loopback_media(peer.address[1])
    frames: list[bytes] = []
    media = CallMedia(rtp, negotiated, to_model=frames.append)
    media.start()
    return rtp, media


def packet(sequence: int, ssrc: int, freq: float) -> bytes:
    payload = g711.encode("PCMU", tone(freq, 8000, 0.02, start=160 * sequence))
    return struct.pack("!BBHII", 0x80, 0, sequence, 160 * sequence, ssrc) + payload


def audio(received: list[tuple[bytes, tuple]]) -> list[tuple[float, float]]:
    """Each received RTP packet's (dominant frequency, level), in order of arrival."""
    out = []
    decoder = codecs.decoder(codecs.spec("PCMU"))
    for data, _ in received:
        if 192 <= data[1] <= 223:
            continue
        pcm = decoder.decode(data[12:])
        level = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
        out.append((hz(pcm), level))
    return out


@realtime_test()
async def test_the_relay_plays_the_models_last_words_then_the_person_packet_by_packet(timing) -> None:
    allocator = port_allocator()
    caller, person = await UdpPeer.open(), await UdpPeer.open()
    caller_rtp, caller_media = await leg(allocator, caller)
    person_rtp, person_media = await leg(allocator, person)
    loop = asyncio.get_running_loop()
    try:
        caller_media.from_model(tone(MODEL_HZ, 24000, 0.08).tobytes())  # the model's last words
        await asyncio.sleep(0.005)
        caller_media.start_relay(person_media.relay)
        person_media.start_relay(caller_media.relay)
        caller_media.from_model(tone(3000, 24000, 0.08).tobytes())  # ignored from now on: the relay plays
        assert caller_media.frames_from_model == 1
        await asyncio.sleep(0.1)  # the person has not spoken yet: the model's words play out meanwhile
        started = loop.time()
        first_in: float | None = None
        caller.drain()
        for n in range(40):  # the person and the caller talk at once, 20 ms apart
            person.send(packet(n, 0x5151, PERSON_HZ), ("127.0.0.1", person_rtp.local_port))
            caller.send(packet(n, 0xCA11, CALLER_HZ), ("127.0.0.1", caller_rtp.local_port))
            await asyncio.sleep(max(0.0, started + 0.02 * (n + 1) - loop.time()))
            if first_in is None and any(abs(f - PERSON_HZ) < 60 and lv > 1000 for f, lv in audio(caller.drain())):
                first_in = loop.time() - started
        await asyncio.sleep(0.2)
    finally:
        caller_media.stop()
        person_media.stop()
        caller_rtp.close()
        person_rtp.close()
    to_person = audio(person.drain())
    caller.close()
    person.close()
    assert first_in is not None, "the person never reached the caller"
    assert caller_media.packets_relayed >= 38 and person_media.packets_relayed >= 38
    assert caller_media.frames_from_model == 1
    loud = [f for f, lv in to_person if lv > 1000]
    assert len(loud) >= 36 and all(abs(f - CALLER_HZ) < 60 for f in loud)  # the caller, whole, to the person
    # a jitter buffer (20 ms at least) and a pacer, not an 80 ms frame and two resamplers
    timing.expect(
        caller_media.pacer.stats.late_dropped == 0 and person_media.pacer.stats.late_dropped == 0,
        f"no relayed packet dropped as late: {caller_media.pacer.stats}, {person_media.pacer.stats}",
    )
    timing.expect(first_in < 0.075, f"the person's first packet reached the caller after {first_in * 1000:.0f} ms")


@realtime_test()
async def test_the_model_s_queued_words_are_not_cut_before_the_person_speaks(timing) -> None:
    allocator = port_allocator()
    caller, person = await UdpPeer.open(), await UdpPeer.open()
    caller_rtp, caller_media = await leg(allocator, caller)
    person_rtp, person_media = await leg(allocator, person)
    try:
        await asyncio.sleep(0.05)
        caller.drain()
        for n in range(3):  # the model's last three frames, 80 ms apart as a worker sends them
            if n:
                await asyncio.sleep(0.08)
            caller_media.from_model(tone(MODEL_HZ, 24000, 0.08).tobytes())
        caller_media.start_relay(person_media.relay)
        person_media.start_relay(caller_media.relay)
        await asyncio.sleep(0.5)
    finally:
        caller_media.stop()
        person_media.stop()
        caller_rtp.close()
        person_rtp.close()
    heard = audio(caller.drain())
    caller.close()
    person.close()
    model = [f for f, lv in heard if lv > 1000]
    assert all(abs(f - MODEL_HZ) < 60 for f in model), model
    # 12 packets (the first may start soft), each heard or dropped by the pacer as late (a
    # timing matter, judged below): none cut by the relay's start
    stats = caller_media.pacer.stats
    assert len(model) + stats.late_dropped >= 11, f"{len(model)} of the model's packets heard: {stats}"
    assert caller_media.packets_relayed == 0  # the person's leg is idle: nothing queued in place of the words
    # the pacer's own start, not the relay: a first frame that comes just after a silence
    # tick has its first packet sent up to ~9 ms past due (the next tick comes no sooner than
    # half a ptime), and dropped when that tick runs over a millisecond late (1 run in ~12)
    timing.expect(
        caller_media.pacer.stats.late_dropped <= 1,
        f"no packet of the model's words dropped but maybe the first: {caller_media.pacer.stats}",
    )
