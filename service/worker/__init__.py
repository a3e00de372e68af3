"""The inference worker: one Moshi model, B slots, one batched step every 80 ms.

See PROTOCOL.md for the session protocol and main.py for the entry point (``run_worker``).
"""
