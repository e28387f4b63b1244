"""Where a webhook may be sent: the rules the API checks at job create and the worker again before each attempt.

A webhook URL is http or https, without credentials, and its host must resolve to addresses
the service may call: public ones, plus the networks MASKTUNE_WEBHOOK_ALLOWED_NETWORKS names.
Loopback, private, link-local (169.254.169.254, the cloud metadata service), multicast,
reserved and unspecified addresses are refused, so a tenant cannot make the service call into
its own network (server-side request forgery). The worker connects to an address it checked,
never to the name again (a second lookup could answer differently: DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2000
DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookUrlError(ValueError):
    """The URL may not receive webhooks; the message says why."""


class HostDoesNotResolve(WebhookUrlError):
    """The host has no address now (it may later)."""


@dataclass(frozen=True)
class WebhookTarget:
    scheme: str
    host: str  # as the URL names it (lower case): the Host header and the TLS server name
    port: int
    path: str  # path and query, as sent

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def url_for(self, address: IPAddress) -> str:
        """The URL with the host replaced by ``address``: the request goes there and nowhere else."""
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse(url: str) -> WebhookTarget:
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"the URL cannot be parsed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise WebhookUrlError(f"the scheme must be http or https, not {scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlError("the URL must not carry credentials (user:password@)")
    if not parts.hostname:
        raise WebhookUrlError("the URL has no host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme], path)


def _normalised(address: IPAddress) -> IPAddress:
    # ::ffff:10.0.0.1 reaches 10.0.0.1: judge the IPv4 address it carries.
    return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address


def is_public(address: IPAddress) -> bool:
    address = _normalised(address)
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_loopback
                                      or address.is_link_local or address.is_private or address.is_unspecified)


def address_allowed(address: IPAddress, allowed_networks: list[str]) -> bool:
    address = _normalised(address)
    return is_public(address) or any(address in ipaddress.ip_network(n) for n in allowed_networks)


def resolve(target: WebhookTarget) -> list[IPAddress]:
    """The host's addresses (an address literal is its own), in the resolver's order, without repeats."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostDoesNotResolve(f"the host {target.host!r} does not resolve ({exc})") from None
    # An IPv6 answer may carry a zone (fe80::1%eth0); the zone never makes an address allowed.
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    return list(dict.fromkeys(addresses))


def allowed_addresses(target: WebhookTarget, allowed_networks: list[str]) -> list[IPAddress]:
    """The host's addresses the service may call, each checked; raises when there is none."""
    addresses = resolve(target)
    allowed = [a for a in addresses if address_allowed(a, allowed_networks)]
    if not allowed:
        shown = ", ".join(str(a) for a in addresses[:4])
        raise WebhookUrlError(f"the host {target.host!r} is {shown}: webhooks go to public addresses only, not to "
                              "loopback, private, link-local (cloud metadata), multicast or reserved ones, unless "
                              "MASKTUNE_WEBHOOK_ALLOWED_NETWORKS allows them")
    return allowed


def check(url: str, allowed_networks: list[str]) -> WebhookTarget:
    """Parse and check a webhook URL as the API does at job create; raises WebhookUrlError."""
    target = parse(url)
    allowed_addresses(target, allowed_networks)
    return target
