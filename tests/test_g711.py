"""G.711 against an independent implementation of the ITU-T tables, plus the codec API."""

from __future__ import annotations

import numpy as np
import pytest

from sip import g711


def ulaw_reference_decode(code: int) -> int:
    """ITU-T G.711 μ-law expansion, written from the standard (not from audioop)."""
    code = ~code & 0xFF
    sign = code & 0x80
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if sign else magnitude


def alaw_reference_decode(code: int) -> int:
    """ITU-T G.711 A-law expansion (13-bit result scaled to 16 bits)."""
    code ^= 0x55
    sign = code & 0x80
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    if exponent == 0:
        magnitude = (mantissa << 4) + 8
    else:
        magnitude = ((mantissa << 4) + 0x108) << (exponent - 1)
    return magnitude if sign else -magnitude


ALL_CODES = bytes(range(256))


def test_ulaw_decoding_matches_the_standard_for_all_256_codes() -> None:
    decoded = g711.decode("PCMU", ALL_CODES)
    assert decoded.dtype == np.int16 and len(decoded) == 256
    assert decoded.tolist() == [ulaw_reference_decode(c) for c in range(256)]


def test_alaw_decoding_matches_the_standard_for_all_256_codes() -> None:
    assert g711.decode("PCMA", ALL_CODES).tolist() == [alaw_reference_decode(c) for c in range(256)]


@pytest.mark.parametrize(("name", "reference"), [("PCMU", ulaw_reference_decode), ("PCMA", alaw_reference_decode)])
def test_encoding_picks_the_nearest_code_for_every_16_bit_value(name, reference) -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    codes = np.frombuffer(g711.encode(name, pcm), dtype=np.uint8)
    levels = np.array([reference(c) for c in range(256)])
    error = np.abs(levels[codes] - pcm.astype(np.int64))
    # G.711 quantises to the decision interval around each level: never worse than half a step
    steps = np.abs(np.diff(np.sort(np.unique(levels))))
    assert error.max() <= steps.max()
    # and the codes decode back to values on the right side
    assert np.all(np.sign(levels[codes][np.abs(pcm) > 100]) == np.sign(pcm[np.abs(pcm) > 100]))


def test_known_values() -> None:
    assert g711.encode("PCMU", np.zeros(4, dtype=np.int16)) == b"\xff" * 4
    assert g711.encode("PCMA", np.zeros(4, dtype=np.int16)) == b"\xd5" * 4
    assert g711.decode("PCMU", b"\x00\x7f\x80\xff").tolist() == [-32124, 0, 32124, 0]
    assert g711.decode("PCMA", b"\x55\xd5\x2a\xaa").tolist() == [-8, 8, -32256, 32256]
    assert g711.silence("PCMA", 3) == b"\xd5\xd5\xd5"


def test_round_trip_error_is_small_relative_to_level() -> None:
    t = np.arange(1600) / 8000
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    for name in ("PCMU", "PCMA"):
        encoder, decoder = g711.G711Encoder(name), g711.G711Decoder(name)
        payload = encoder.encode(tone)
        assert len(payload) == len(tone)
        back = decoder.decode(payload)
        snr = 10 * np.log10(np.sum(tone.astype(float) ** 2) / np.sum((back - tone.astype(float)) ** 2))
        assert snr > 30  # G.711 gives ~38 dB on a loud tone
        assert decoder.decode_bytes(payload) == back.tobytes()
        assert encoder.encode(tone.tobytes()) == payload


def test_codec_lookup() -> None:
    assert g711.codec("pcmu").payload_type == 0
    assert g711.codec("PCMA").payload_type == 8
    assert g711.codec_for_payload_type(8).name == "PCMA"
    with pytest.raises(ValueError, match="unknown G.711 codec"):
        g711.codec("G722")
    with pytest.raises(ValueError, match="payload type 9"):
        g711.codec_for_payload_type(9)


def test_bad_pcm_is_refused_clearly() -> None:
    encoder = g711.G711Encoder("PCMU")
    with pytest.raises(TypeError, match="int16"):
        encoder.encode(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        encoder.encode(np.zeros((2, 4), dtype=np.int16))
    with pytest.raises(ValueError, match="even length"):
        encoder.encode(b"\x00\x01\x02")


def test_strided_arrays_are_encoded_correctly() -> None:
    stereo = np.arange(-200, 200, dtype=np.int16).reshape(-1, 2)
    left = stereo[:, 0]
    assert g711.encode("PCMU", left) == g711.encode("PCMU", left.copy())


def test_quiet_detector_runs_on_encoded_bytes() -> None:
    for name in ("PCMU", "PCMA"):
        is_quiet = g711.quiet_detector(name)
        assert is_quiet(g711.silence(name, 160))
        assert is_quiet(g711.encode(name, np.full(160, 30, dtype=np.int16)))
        loud = np.zeros(160, dtype=np.int16)
        loud[80] = 2000
        assert not is_quiet(g711.encode(name, loud))
