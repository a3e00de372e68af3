"""Routing a call to a worker slot and the session with that worker."""
