"""Telephone numbers as routes compare them: one canonical form for E.164 and national dialling.

A dialled number reaches the gateway in whatever form the trunk delivers it: E.164
(``+81312345678``), national with the trunk prefix (``0312345678``, ``03-1234-5678``), or
international with the country's exit code (``010 1 212…`` from Japan). Routes compare
:func:`canonical` forms, so ``03…`` and ``+813…`` are the same number for a plan with
country code 81. Text that is not a number (``agent``, ``support-line``) is kept as it is,
lower-cased, so a route can match a SIP user name as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VISUAL_SEPARATORS = re.compile(r"[-.() ]")  # RFC 3966 visual separators
DIGITS = re.compile(r"\+?[0-9*#]+")


@dataclass(frozen=True)
class NumberPlan:
    """How national and international numbers are written where the gateway runs
    (default: Japan, +81, trunk prefix 0, exit code 010)."""

    country_code: str = "81"
    national_prefix: str = "0"
    international_prefix: str = "010"

    def canonical(self, text: str) -> str:
        """The form routes compare: ``+<country><number>`` for a number this plan can place,
        the digits as given for one it cannot (a short code), the lower-cased text for a
        name (see the module docstring)."""
        stripped = VISUAL_SEPARATORS.sub("", text.strip())
        if not stripped or not DIGITS.fullmatch(stripped):
            return text.strip().lower()
        if stripped.startswith("+"):
            return stripped
        if self.international_prefix and stripped.startswith(self.international_prefix):
            return "+" + stripped[len(self.international_prefix) :]
        if self.national_prefix and stripped.startswith(self.national_prefix):
            return "+" + self.country_code + stripped[len(self.national_prefix) :]
        return stripped


JAPAN = NumberPlan()
