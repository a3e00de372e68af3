"""baresip's configuration folder, for the tests and benchmarks that use it as a SIP phone
on 127.0.0.1: it plays a WAV file as its microphone and writes what it hears to another."""

from __future__ import annotations

import typing as tp
from pathlib import Path

MODULES = Path("/usr/lib/baresip/modules")


def write_baresip_config(
    config: Path,
    *,
    port: int,
    source: Path,
    folder: Path,
    account: str,
    rtp_ports: tuple[int, int],
    heard: str = "played.wav",
    dumps: bool = True,
    srate: int = 8000,
    codecs: tp.Sequence[str] = ("g711",),
    modules: tp.Sequence[str] = (),
    extra: tp.Sequence[str] = (),
) -> Path:
    """Write baresip's ``config``, ``accounts`` (the one ``account`` line) and ``contacts``
    in the folder ``config``; returns it.

    baresip listens for SIP on ``port``, sends ``source``, writes what it hears to
    ``folder/heard`` and sends RTP from ``rtp_ports``. With ``dumps`` (the sndfile module)
    it also writes the audio each way, encoded and decoded, to ``folder/dump-*.wav``.
    ``codecs`` are the codec modules it loads, ``modules`` more modules loaded after the
    others (``srtp``), ``extra`` more config lines."""
    config.mkdir(parents=True, exist_ok=True)
    lines = [
        "poll_method epoll",
        f"sip_listen 127.0.0.1:{port}",
        f"audio_source aufile,{source}",
        f"audio_player aufile,{folder / heard}",
        f"audio_alert aufile,{folder / 'alert.wav'}",
        f"audio_srate {srate}",
        "audio_channels 1",
        f"rtp_ports {rtp_ports[0]}-{rtp_ports[1]}",
        *([f"snd_path {folder}"] if dumps else []),
        f"module_path {MODULES}",
        "module stdio.so",
        *(f"module {codec}.so" for codec in codecs),
        "module aufile.so",
        *(["module sndfile.so"] if dumps else []),
        *(f"module {module}.so" for module in modules),
        "module_app account.so",
        "module_app contact.so",
        "module_app menu.so",
        *extra,
        "",
    ]
    (config / "config").write_text("\n".join(lines))
    (config / "accounts").write_text(account + "\n")
    (config / "contacts").write_text("")
    return config
