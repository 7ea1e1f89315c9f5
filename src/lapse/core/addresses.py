"""The block of addresses a client is taken to be: one rule for throttles, pre-auth quotas and ``on_ip_change``."""

from __future__ import annotations

import ipaddress


def block(ip: str, v4_prefix: int = 32) -> str:
    """``ip``'s network: an IPv6 address by its /64 (one host, or one customer, is given a whole /64, and
    privacy extensions, RFC 8981, rotate the rest), an IPv4 address by ``v4_prefix`` bits, an IPv4-mapped
    IPv6 address as the IPv4 one. Text that is no address is its own block."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 64 if address.version == 6 else v4_prefix
    return str(ipaddress.ip_network((address, prefix), strict=False))
