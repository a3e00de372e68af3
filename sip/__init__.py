"""sip: the telephony edge as a protocol library.

SIP messages, transports, transactions and dialogs (RFC 3261), SDP offer/answer
(RFC 3264/4566), RTP/RTCP (RFC 3550), a jitter buffer with a playout deadline, G.711 and
RFC 4733 DTMF. It knows nothing of models, Redis or HTTP: ``service`` builds on it, never
the other way round.
"""
