"""Tools that are not part of the service's production path (the test caller)."""
