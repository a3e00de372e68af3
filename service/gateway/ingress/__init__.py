"""Ingresses: each translates one kind of signalling (SIP, WebRTC) into the call lifecycle."""
