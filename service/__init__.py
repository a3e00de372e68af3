"""service: the moshimoshi application (gateway, worker, pool, API) built on ``sip``."""

__version__ = "0.1.0"
