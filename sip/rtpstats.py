"""RTP reception and sending statistics for RTCP reports (RFC 3550 Appendix A.1, A.3, A.8).

:class:`SourceStatistics` follows the RFC's reference code for one source: sequence
validation with probation, 16-bit wrap-around counted in ``cycles``, a jump beyond
``MAX_DROPOUT`` accepted only when the next packet confirms it, cumulative and interval
loss, interarrival jitter, and the LSR/DLSR pair that lets the sender of an SR compute the
round trip. :class:`ReceiverStatistics` follows the current source across SSRC changes;
:class:`SenderStatistics` counts what we sent for our SRs.
"""

from __future__ import annotations

from sip.rtcp import ReportBlock, ntp_middle

RTP_SEQ_MOD = 1 << 16
MAX_DROPOUT = 3000
MAX_MISORDER = 100
MIN_SEQUENTIAL = 2


class SourceStatistics:
    """Reception statistics of one remote source (one SSRC)."""

    __slots__ = (
        "ssrc",
        "clock_rate",
        "max_seq",
        "cycles",
        "base_seq",
        "bad_seq",
        "probation",
        "received",
        "expected_prior",
        "received_prior",
        "transit",
        "jitter",
        "last_sr",
        "last_sr_arrival",
        "fraction_lost",
    )

    def __init__(self, ssrc: int, sequence: int, clock_rate: int) -> None:
        self.ssrc = ssrc
        self.clock_rate = clock_rate
        self._init_sequence(sequence)
        self.max_seq = (sequence - 1) & 0xFFFF
        self.probation = MIN_SEQUENTIAL
        self.transit: float | None = None
        self.jitter = 0.0  # timestamp units, as in A.8
        self.last_sr = 0
        self.last_sr_arrival = 0.0
        self.fraction_lost = 0  # of the last interval, 1/256 units

    def _init_sequence(self, sequence: int) -> None:
        self.base_seq = sequence
        self.max_seq = sequence
        self.bad_seq = RTP_SEQ_MOD + 1  # so sequence == bad_seq is false
        self.cycles = 0
        self.received = 0
        self.received_prior = 0
        self.expected_prior = 0

    def update_sequence(self, sequence: int) -> bool:
        """A.1 ``update_seq``: count the packet; False while on probation or for an unconfirmed jump."""
        udelta = (sequence - self.max_seq) & 0xFFFF
        if self.probation:
            if sequence == (self.max_seq + 1) & 0xFFFF:
                self.probation -= 1
                self.max_seq = sequence
                if self.probation == 0:
                    self._init_sequence(sequence)
                    self.received += 1
                    return True
            else:
                self.probation = MIN_SEQUENTIAL - 1
                self.max_seq = sequence
            return False
        if udelta < MAX_DROPOUT:
            # in order, with a permissible gap
            if sequence < self.max_seq:
                self.cycles += RTP_SEQ_MOD
            self.max_seq = sequence
        elif udelta <= RTP_SEQ_MOD - MAX_MISORDER:
            # a very large jump: believe it only when the next packet follows it
            if sequence == self.bad_seq:
                self._init_sequence(sequence)
            else:
                self.bad_seq = (sequence + 1) & 0xFFFF
                return False
        # else: duplicate or reordered packet, counted
        self.received += 1
        return True

    def update_jitter(self, rtp_timestamp: int, arrival: float) -> None:
        """A.8: interarrival jitter; ``arrival`` in seconds on any steady clock."""
        transit = arrival * self.clock_rate - rtp_timestamp
        previous = self.transit
        self.transit = transit
        if previous is None:
            return
        d = transit - previous
        # timestamps are 32-bit: fold a wrap between two packets back into range
        if d > 0x80000000:
            d -= 0x100000000
        elif d < -0x80000000:
            d += 0x100000000
        if d < 0:
            d = -d
        self.jitter += (d - self.jitter) / 16.0

    def on_sender_report(self, ntp_timestamp: int, arrival: float) -> None:
        """Remember an SR from this source for the LSR/DLSR of our next report."""
        self.last_sr = ntp_middle(ntp_timestamp)
        self.last_sr_arrival = arrival

    @property
    def extended_max(self) -> int:
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        return self.extended_max - self.base_seq + 1

    @property
    def cumulative_lost(self) -> int:
        """A.3: expected minus received (negative when duplicates outnumber losses)."""
        if self.probation:
            return 0
        return self.expected - self.received

    @property
    def jitter_seconds(self) -> float:
        return self.jitter / self.clock_rate

    def report_block(self, now: float) -> ReportBlock:
        """A reception report for an RTCP RR/SR sent at ``now``; starts a new loss interval."""
        expected = self.expected if not self.probation else 0
        expected_interval = expected - self.expected_prior
        self.expected_prior = expected
        received_interval = self.received - self.received_prior
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        if expected_interval <= 0 or lost_interval <= 0:
            self.fraction_lost = 0
        else:
            self.fraction_lost = min(255, (lost_interval << 8) // expected_interval)
        lost = max(-0x800000, min(0x7FFFFF, self.cumulative_lost))
        dlsr = 0
        if self.last_sr:
            dlsr = min(0xFFFFFFFF, max(0, int((now - self.last_sr_arrival) * 65536)))
        return ReportBlock(
            ssrc=self.ssrc,
            fraction_lost=self.fraction_lost,
            cumulative_lost=lost,
            highest_sequence=self.extended_max & 0xFFFFFFFF,
            jitter=min(0xFFFFFFFF, int(self.jitter)),
            lsr=self.last_sr,
            dlsr=dlsr,
        )


class ReceiverStatistics:
    """Statistics of the current remote source, restarted on an SSRC change.

    Losses of earlier sources stay in ``packets_lost`` so a call's totals survive a change.
    """

    __slots__ = ("clock_rate", "source", "ssrc_changes", "_lost_before", "_received_before", "octets")

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.source: SourceStatistics | None = None
        self.ssrc_changes = 0
        self._lost_before = 0
        self._received_before = 0
        self.octets = 0

    def update(
        self,
        ssrc: int,
        sequence: int,
        rtp_timestamp: int,
        arrival: float,
        payload_size: int,
        measure_jitter: bool = True,
    ) -> bool:
        """Account one received packet; False when sequence validation does not accept it (yet).

        ``measure_jitter`` is False for packets whose timestamps do not advance with the
        media clock (RFC 4733 events repeat one timestamp for a whole digit).
        """
        source = self.source
        if source is None or source.ssrc != ssrc:
            if source is not None:
                self.ssrc_changes += 1
                self._lost_before += max(0, source.cumulative_lost)
                self._received_before += source.received
            source = self.source = SourceStatistics(ssrc, sequence, self.clock_rate)
        self.octets += payload_size
        # every packet of a call passes here: the usual one, the next in sequence after
        # probation, is counted inline (what update_sequence and update_jitter do for it)
        if sequence == ((source.max_seq + 1) & 0xFFFF) and not source.probation:
            if sequence == 0:
                source.cycles += RTP_SEQ_MOD
            source.max_seq = sequence
            source.received += 1
            if measure_jitter:
                transit = arrival * source.clock_rate - rtp_timestamp
                previous = source.transit
                source.transit = transit
                if previous is not None:
                    d = transit - previous
                    if d > 0x80000000:
                        d -= 0x100000000
                    elif d < -0x80000000:
                        d += 0x100000000
                    if d < 0:
                        d = -d
                    source.jitter += (d - source.jitter) / 16.0
            return True
        valid = source.update_sequence(sequence)
        if measure_jitter:
            source.update_jitter(rtp_timestamp, arrival)
        return valid

    @property
    def packets_lost(self) -> int:
        current = max(0, self.source.cumulative_lost) if self.source is not None else 0
        return self._lost_before + current

    @property
    def packets_received(self) -> int:
        current = self.source.received if self.source is not None else 0
        return self._received_before + current

    @property
    def jitter_seconds(self) -> float:
        return self.source.jitter_seconds if self.source is not None else 0.0

    @property
    def fraction_lost(self) -> float:
        """Loss of the last reported interval, 0..1."""
        return self.source.fraction_lost / 256.0 if self.source is not None else 0.0

    def on_sender_report(self, ssrc: int, ntp_timestamp: int, arrival: float) -> None:
        if self.source is not None and self.source.ssrc == ssrc:
            self.source.on_sender_report(ntp_timestamp, arrival)

    def report_blocks(self, now: float) -> list[ReportBlock]:
        return [self.source.report_block(now)] if self.source is not None else []


class SenderStatistics:
    """What we sent, for the sender info of our SRs (RFC 3550 §6.4.1)."""

    __slots__ = ("clock_rate", "packets", "octets", "last_timestamp", "last_time")

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.packets = 0
        self.octets = 0
        self.last_timestamp = 0
        self.last_time: float | None = None

    def on_sent(self, payload_size: int, now: float, rtp_timestamp: int | None = None) -> None:
        """Count a packet; pass ``rtp_timestamp`` for packets on the media clock (not DTMF events)."""
        self.packets += 1
        self.octets += payload_size
        if rtp_timestamp is not None:
            self.last_timestamp = rtp_timestamp
            self.last_time = now

    def rtp_timestamp_at(self, now: float) -> int:
        """Our media clock at ``now``, extrapolated from the last packet sent."""
        if self.last_time is None:
            return 0
        return (self.last_timestamp + int(round((now - self.last_time) * self.clock_rate))) & 0xFFFFFFFF

    @property
    def packet_count(self) -> int:
        return self.packets & 0xFFFFFFFF

    @property
    def octet_count(self) -> int:
        return self.octets & 0xFFFFFFFF
