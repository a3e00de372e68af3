"""Who called and which number they dialled, from an INVITE's identity headers.

- ``P-Asserted-Identity`` (RFC 3325): the identity a trusted network asserts;
- ``Remote-Party-ID`` (draft-ietf-sip-privacy, still sent by many PBXs): the same, with its
  own ``privacy=full|name|uri|off`` and ``screen`` parameters;
- ``Privacy`` (RFC 3323, RFC 3325 ``id``, RFC 7044 ``history``): what must not be shown;
- ``Diversion`` (RFC 5806) and ``History-Info`` (RFC 7044): where the call was redirected from;
- the dialled number: the Request-URI's user part, which behind a proxy or a trunk differs
  from the ``To`` header (the DID the carrier delivered).

Everything here is attacker input: every value is bounded (``MAX_VALUE_CHARS`` characters,
control characters replaced, ``MAX_ENTRIES`` entries per header) and ``truncated`` says
when something was cut. Parsing never raises: an unparsable identity keeps its (bounded)
text and no number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sip.errors import SipParseError
from sip.grammar import split_list
from sip.headers import Address
from sip.message import Request
from sip.uri import SipUri

MAX_VALUE_CHARS = 256
MAX_NUMBER_CHARS = 64
MAX_ENTRIES = 5
ANONYMOUS_URI = "sip:anonymous@anonymous.invalid"  # RFC 3323 §4.1.1.3
# Privacy values that withhold the caller's identity: id (RFC 3325), user and header (RFC 3323).
_IDENTITY_PRIVACY = frozenset({"id", "user", "header"})


def _clean(text: str, limit: int = MAX_VALUE_CHARS) -> tuple[str, bool]:
    """``text`` without control characters, at most ``limit`` characters; and whether it was cut."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[: limit + 1]).strip()
    if len(cleaned) > limit:
        return cleaned[:limit], True
    return cleaned, len(text) > limit + 1


@dataclass(frozen=True)
class Party:
    """One identity: display name, URI and the number (user part of a SIP URI, or a tel: number)."""

    name: str = ""
    uri: str = ""
    number: str = ""
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, where: str) -> tuple[Party, bool]:
        raw, cut = _clean(text)
        try:
            address = Address.parse(text, where)
        except SipParseError:
            return cls(uri=raw), cut
        name, name_cut = _clean(address.display_name or "")
        uri, uri_cut = _clean(str(address.uri))
        user = address.uri.user if isinstance(address.uri, SipUri) else getattr(address.uri, "user", None)
        number, number_cut = _clean(user or "", MAX_NUMBER_CHARS)
        params = {}
        for key in ("privacy", "screen", "party", "reason", "index", "counter"):
            value = address.params.get(key)
            if value is not None:
                params[key] = _clean(value, 32)[0].lower()
        return cls(name, uri, number, params), cut or name_cut or uri_cut or number_cut

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "uri": self.uri, "number": self.number}
        if self.params:
            out["params"] = dict(self.params)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Party:
        return cls(
            str(data.get("name", "")),
            str(data.get("uri", "")),
            str(data.get("number", "")),
            {str(k): str(v) for k, v in (data.get("params") or {}).items()},
        )


@dataclass(frozen=True)
class CallerIdentity:
    """The identity headers of one INVITE, bounded; see the module docstring."""

    dialled: str = ""
    from_party: Party = field(default_factory=Party)
    asserted: tuple[Party, ...] = ()
    remote_party: Party | None = None
    privacy: tuple[str, ...] = ()
    diversion: tuple[Party, ...] = ()
    history_info: tuple[Party, ...] = ()
    truncated: bool = False

    @classmethod
    def from_request(cls, request: Request) -> CallerIdentity:
        cut = False

        def parties(name: str) -> tuple[Party, ...]:
            nonlocal cut
            found: list[Party] = []
            for value in request.headers.get_all(name):
                try:
                    elements = split_list(value, name)
                except SipParseError:
                    elements = [value]
                for element in elements:
                    if not element:
                        continue
                    if len(found) == MAX_ENTRIES:
                        cut = True
                        return tuple(found)
                    party, party_cut = Party.parse(element, name)
                    cut = cut or party_cut
                    found.append(party)
            return tuple(found)

        uri = request.uri
        dialled, dialled_cut = _clean((uri.user or "") if isinstance(uri, SipUri) else "", MAX_NUMBER_CHARS)
        from_party, from_cut = Party.parse(request.headers.get("From") or "", "From")
        privacy: list[str] = []
        for value in request.headers.get_all("Privacy"):
            for token in value.replace(",", ";").split(";"):
                token = token.strip().lower()
                if token and len(privacy) < MAX_ENTRIES:
                    privacy.append(_clean(token, 32)[0])
        remote = parties("Remote-Party-ID")
        calling = next((p for p in remote if p.params.get("party", "calling") == "calling"), None)
        return cls(
            dialled=dialled,
            from_party=from_party,
            asserted=parties("P-Asserted-Identity"),
            remote_party=calling,
            privacy=tuple(privacy),
            diversion=parties("Diversion"),
            history_info=parties("History-Info"),
            truncated=cut or dialled_cut or from_cut,
        )

    # -- what may be shown ----------------------------------------------------------------

    @property
    def withheld(self) -> bool:
        """The caller's number must not be shown: ``Privacy: id``/``user``/``header``, or a
        Remote-Party-ID with ``privacy=full`` or ``uri``."""
        rpid = self.remote_party.params.get("privacy", "off") if self.remote_party is not None else "off"
        return bool(_IDENTITY_PRIVACY & set(self.privacy)) or rpid in ("full", "uri")

    @property
    def name_withheld(self) -> bool:
        rpid = self.remote_party.params.get("privacy", "off") if self.remote_party is not None else "off"
        return self.withheld or rpid == "name"

    @property
    def redirects_withheld(self) -> bool:
        """Diversion and History-Info must not be shown (``Privacy: header`` or ``history``)."""
        return bool({"header", "history"} & set(self.privacy))

    @property
    def caller(self) -> Party:
        """Who called, best source first: P-Asserted-Identity (a tel: URI or a SIP URI with
        a number), Remote-Party-ID, then From."""
        for party in self.asserted:
            if party.number:
                return party
        if self.remote_party is not None and self.remote_party.number:
            return self.remote_party
        return self.from_party

    @property
    def caller_source(self) -> str:
        caller = self.caller
        if caller in self.asserted:
            return "p-asserted-identity"
        if caller is self.remote_party:
            return "remote-party-id"
        return "from"

    # -- storage --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "dialled": self.dialled,
            "from": self.from_party.to_dict(),
            "asserted": [p.to_dict() for p in self.asserted],
            "remote_party": self.remote_party.to_dict() if self.remote_party is not None else None,
            "privacy": list(self.privacy),
            "diversion": [p.to_dict() for p in self.diversion],
            "history_info": [p.to_dict() for p in self.history_info],
            "truncated": self.truncated,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallerIdentity:
        remote = data.get("remote_party")
        return cls(
            dialled=str(data.get("dialled", "")),
            from_party=Party.from_dict(data["from"] if isinstance(data.get("from"), dict) else {}),
            asserted=tuple(Party.from_dict(p) for p in data.get("asserted") or [] if isinstance(p, dict)),
            remote_party=Party.from_dict(remote) if isinstance(remote, dict) else None,
            privacy=tuple(str(p) for p in data.get("privacy") or []),
            diversion=tuple(Party.from_dict(p) for p in data.get("diversion") or [] if isinstance(p, dict)),
            history_info=tuple(Party.from_dict(p) for p in data.get("history_info") or [] if isinstance(p, dict)),
            truncated=bool(data.get("truncated", False)),
        )
