"""Routes: which model and policy each dialled number gets (see ``schema.py``)."""
