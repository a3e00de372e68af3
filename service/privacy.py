"""Personal data as logs, dashboards and short-lived records may show it.

A caller's number is personal data: wherever it is shown outside the call's own record
(logs, the record of refused calls, the dashboard) it is masked but for its last four
digits, as call centers print it on receipts.
"""

from __future__ import annotations

import typing as tp

from sip.identity import CallerIdentity

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


WITHHELD = "withheld"


def masked_caller(identity: CallerIdentity | dict[str, tp.Any] | None, from_uri: str = "") -> str:
    """The caller as the logs and the dashboard show it: the best-sourced number (an
    asserted identity, else From) masked; ``withheld`` when the caller asked for privacy,
    ``unknown`` when there is no number."""
    if isinstance(identity, dict):
        identity = CallerIdentity.from_dict(identity)
    if identity is not None:
        if identity.withheld:
            return WITHHELD
        number = identity.caller.number
    else:
        user = from_uri.strip("<>").split(":", 1)[-1]
        number = user.split("@", 1)[0] if "@" in user else ""
    return mask_number(number) if number else "unknown"
