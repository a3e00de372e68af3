"""Address lists: which sources a SIP edge lets in (Kamailio ``permissions``, Asterisk ``acl``).

``AddressList.parse("203.0.113.0/24, 2001:db8::/32")`` reads CIDRs (a bare address is a
/32 or /128); ``address in acl`` tests a source address as the kernel reports it (an
IPv4-mapped IPv6 address counts as its IPv4 address). ``PRIVATE_NETWORKS`` is the default
of a gateway: loopback and private ranges only, so that a public address must be listed on
purpose.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PRIVATE_NETWORKS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")


def ip_of(host: str) -> IpAddress | None:
    """``host`` as an address (IPv4-mapped IPv6 unwrapped, a zone id dropped), or None."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def canonical_ip(host: str) -> str | None:
    """The one spelling of ``host`` as an IP address (``0:0::1`` → ``::1``), or None."""
    address = ip_of(host)
    return None if address is None else str(address)


class AddressList:
    """A set of IPv4 and IPv6 networks; ``in`` tests an address against them."""

    def __init__(self, networks: Iterable[IpNetwork] = ()) -> None:
        self.networks: tuple[IpNetwork, ...] = tuple(networks)
        self._v4 = tuple(n for n in self.networks if n.version == 4)
        self._v6 = tuple(n for n in self.networks if n.version == 6)

    @classmethod
    def parse(cls, entries: str | Iterable[str]) -> AddressList:
        """CIDRs, comma-separated or as a list. Raises ValueError naming the bad entry."""
        if isinstance(entries, str):
            entries = entries.split(",")
        networks: list[IpNetwork] = []
        for entry in entries:
            text = entry.strip()
            if not text:
                continue
            try:
                network = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not an IP address or CIDR (e.g. 203.0.113.0/24)") from None
            if isinstance(network, ipaddress.IPv6Network):
                mapped = network.network_address.ipv4_mapped
                if mapped is not None and network.prefixlen >= 96:
                    network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
            networks.append(network)
        return cls(networks)

    def __contains__(self, host: object) -> bool:
        if isinstance(host, str):
            address = ip_of(host)
        elif isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address):
            address = host
        else:
            return False
        if address is None:
            return False
        networks = self._v4 if address.version == 4 else self._v6
        return any(address in network for network in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.networks)

    def __repr__(self) -> str:
        return f"AddressList({str(self)!r})"
