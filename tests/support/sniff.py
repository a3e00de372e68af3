"""What goes over the loopback wire: UDP datagrams captured with a raw AF_PACKET socket
(root, as the tests run), for checks that media is really encrypted on the way."""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@dataclass(frozen=True)
class Datagram:
    source: tuple[str, int]
    destination: tuple[str, int]
    payload: bytes
    at: float = 0.0  # wall clock when the capture thread read it


def can_sniff() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)).close()
    except (OSError, AttributeError):
        return False
    return True


class LoopbackSniffer:
    """Captures UDP datagrams on ``lo`` whose source or destination port is in ``ports``
    (a set the test may fill in later), in a thread, until ``stop()``."""

    def __init__(self, ports: set[int] | None = None) -> None:
        self.ports = ports if ports is not None else set()
        self.datagrams: list[Datagram] = []
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sniffer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, address = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if address[2] == PACKET_OUTGOING:  # loopback shows each packet twice
                continue
            at = time.time()
            datagram = _udp(frame[14:], at)  # lo frames carry an Ethernet header of zeros
            if datagram is not None and (datagram.source[1] in self.ports or datagram.destination[1] in self.ports):
                self.datagrams.append(datagram)

    def stop(self) -> list[Datagram]:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        return self.datagrams

    def __enter__(self) -> LoopbackSniffer:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.stop()


def _udp(packet: bytes, at: float = 0.0) -> Datagram | None:
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        header = (packet[0] & 0x0F) * 4
        total, protocol = struct.unpack_from("!H", packet, 2)[0], packet[9]
        if protocol != 17:
            return None
        src, dst = socket.inet_ntop(socket.AF_INET, packet[12:16]), socket.inet_ntop(socket.AF_INET, packet[16:20])
        udp = packet[header:total]
    elif version == 6 and len(packet) >= 48 and packet[6] == 17:
        src, dst = socket.inet_ntop(socket.AF_INET6, packet[8:24]), socket.inet_ntop(socket.AF_INET6, packet[24:40])
        udp = packet[40 : 40 + struct.unpack_from("!H", packet, 4)[0]]
    else:
        return None
    if len(udp) < 8:
        return None
    sport, dport = struct.unpack_from("!HH", udp)
    return Datagram((src, sport), (dst, dport), udp[8:], at)


def entropy_bits_per_byte(data: bytes) -> float:
    """Shannon entropy of the byte values: ~8 for ciphertext, well below for audio codecs."""
    if not data:
        return 0.0
    counts = Counter(data)
    total = len(data)
    return -sum(n / total * math.log2(n / total) for n in counts.values())
