"""A call's life on this gateway: its state, record and transcript."""
