"""Which webhook URLs the service calls: ``http``/``https`` only, and by default only hosts
whose addresses are all public (no loopback, private, link-local, multicast, reserved or
shared address: a webhook must not become a way to reach the server's own network).
Checked when an endpoint is registered and again at each delivery, which then connects to
the very address it checked (a name that resolves elsewhere a second time gains nothing)."""

from __future__ import annotations

import ipaddress
import socket
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

MAX_URL_CHARS = 2048
RESOLVE_TIMEOUT_S = 3.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="das-webhook-dns")


class UnsafeAddress(ValueError):
    """The URL's host is, or resolves to, an address webhooks may not reach."""


class NameResolutionError(OSError):
    """The URL's host name did not resolve (in time)."""


@dataclass(frozen=True)
class Target:
    """Where one delivery goes: the URL with its host replaced by the checked address, and
    the name the request carries (``Host`` header, TLS server name)."""

    url: httpx.URL
    host_header: str
    sni_hostname: str | None  # None for a URL that names an address


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook endpoint (syntax only), or None."""
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate (not valid Unicode)"
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in url):
        return "contains white space or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@)"
    if parts.fragment:
        return "must not have a #fragment"
    if port == 0:
        return "port 0 is not a port"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def resolve(host: str, port: int, timeout: float = RESOLVE_TIMEOUT_S) -> list[IPAddress]:
    """The addresses of ``host`` (itself when an address); NameResolutionError otherwise."""
    literal = _literal(host)
    if literal is not None:
        return [literal]
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=timeout)
    except FutureTimeout as exc:
        raise NameResolutionError(f"{host}: no answer in {timeout:g} s") from exc
    except (OSError, UnicodeError) as exc:
        raise NameResolutionError(f"{host}: {exc}") from exc
    addresses = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise NameResolutionError(f"{host}: no address")
    return addresses


def _checked(addresses: list[IPAddress], allow_private: bool) -> list[IPAddress]:
    if not allow_private:
        refused = [a for a in addresses if not is_public(a)]
        if refused:
            raise UnsafeAddress(
                f"its address {refused[0]} is not public (the operator may allow "
                "private addresses with DAS_WEBHOOK_ALLOW_PRIVATE=true)"
            )
    return addresses


def registration_problem(url: str, *, allow_private: bool) -> str | None:
    """Why ``url`` cannot be registered, or None. A name that does not resolve now is
    accepted (DNS may be set up later); each delivery checks again."""
    try:
        parsed = _parse(url)
        if not allow_private:
            _checked(resolve(_host(parsed), _port(parsed)), allow_private=False)
    except ValueError as exc:  # UnsafeAddress included
        return str(exc)
    except NameResolutionError:
        return None
    return None


def delivery_target(url: str, *, allow_private: bool) -> Target:
    """Where to send a delivery now: raises UnsafeAddress, NameResolutionError or
    ValueError (a URL stored before a stricter check)."""
    parsed = _parse(url)
    host = _host(parsed)
    address = _checked(resolve(host, _port(parsed)), allow_private)[0]
    return Target(
        url=parsed.copy_with(host=str(address)),
        host_header=parsed.netloc.decode("ascii"),
        sni_hostname=None if _literal(host) is not None else host,
    )


def _parse(url: str) -> httpx.URL:
    """The URL as it will be requested (IDNA host, percent-encoded path and query), or
    ValueError."""
    why = url_problem(url)
    if why:
        raise ValueError(why)
    try:
        return httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(str(exc)) from exc


def _host(parsed: httpx.URL) -> str:
    return parsed.raw_host.decode("ascii")


def _port(parsed: httpx.URL) -> int:
    return parsed.port or (443 if parsed.scheme == "https" else 80)
