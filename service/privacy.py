"""Personal data as logs, dashboards and short-lived records may show it.

A caller's number is personal data: wherever it is shown outside the call's own record
(logs, the record of refused calls, the dashboard) it is masked but for its last four
digits, as call centers print it on receipts.
"""

from __future__ import annotations

KEPT_DIGITS = 4
MASK = "*"


def mask_number(number: str | None) -> str:
    """``+819012345678`` → ``*********5678``; a number of four characters or fewer is
    masked whole, an empty one stays empty. Only the last four *digits* are kept: a SIP
    user part that is a name (``alice``) is masked whole too."""
    if not number:
        return ""
    tail = number[-KEPT_DIGITS:]
    if len(number) <= KEPT_DIGITS or not tail.isdigit():
        return MASK * min(len(number), 16)
    return MASK * min(len(number) - KEPT_DIGITS, 16) + tail
