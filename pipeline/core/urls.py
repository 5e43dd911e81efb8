"""Which URLs of an untrusted list are fetched at all.

img2dataset fetches with ``urllib``, which also opens ``file://``, ``data:`` and
``ftp://`` URLs and any host, the machine itself included. ``url_refusal``
decides per URL, before any fetch, from the URL text alone (no DNS lookup):

- only ``download.allowed_schemes`` (http, https) are fetched;
- a host that is ``localhost`` or a literal loopback, private, link-local,
  unspecified or otherwise non-global address (127/8, 10/8, 172.16/12,
  192.168/16, 169.254/16 with the cloud metadata address, 100.64/10, 0/8,
  ::1, fc00::/7, fe80::/10, IPv4-mapped / -compatible / NAT64 / 6to4 forms of
  those, and the integer, hex and octal spellings ``inet_aton`` accepts) is
  refused unless ``download.allow_private_addresses``.

Not covered: a hostname that resolves to a private address, and a redirect
from a public URL to a private one (urllib follows redirects to http, https
and ftp).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
NEEDS_HOST = {"http", "https", "ftp"}
PRIVATE = ("refused: the host is a loopback, private or link-local address "
           "(set download.allow_private_addresses to fetch it)")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _literal_ip(host: str):
    """The address ``host`` spells, or None for a name (no DNS lookup)."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host):
        try:  # 2130706433, 0x7f000001, 0177.0.0.1, 127.1: what the C resolver accepts
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _embedded_v4(addr):
    """The IPv4 address inside an IPv6 one (mapped, compatible, NAT64, 6to4), if any."""
    if addr.version != 6:
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if int(addr) >> 32 == 0 and int(addr) > 1:  # ::a.b.c.d (deprecated IPv4-compatible)
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_private_host(host: str) -> bool:
    """``localhost`` or a literal address that is not globally routable."""
    host = host.lower().rstrip(".")
    if host in LOCAL_NAMES or host.endswith(".localhost"):
        return True
    addr = _literal_ip(host)
    if addr is None:
        return False
    inner = _embedded_v4(addr)
    if inner is not None:
        return not inner.is_global
    return not addr.is_global


_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})  # label separators IDNA maps to "."


def fetch_form(url: str) -> str:
    """``url`` as urllib will fetch it: surrounding spaces and control characters stripped, tabs and
    newlines removed (``urlsplit`` drops them too), and a non-ASCII host NFKC-normalised with IDNA's
    label separators, as the IDNA encoding urllib's resolver applies does: ``http://ｌｏｃａｌｈｏｓｔ/``
    and ``http://１２７。０。０。１/`` are fetched as localhost and 127.0.0.1, so they are judged so."""
    import unicodedata

    u = str(url).strip("".join(map(chr, range(33)))).translate({9: None, 10: None, 13: None})
    try:
        parts = urlsplit(u)
    except ValueError:
        return u
    if parts.netloc.isascii():
        return u
    userinfo, at, hostport = parts.netloc.rpartition("@")
    host = unicodedata.normalize("NFKC", hostport).translate(_IDNA_DOTS).lower()
    return parts._replace(netloc=f"{userinfo}{at}{host}").geturl()


def url_refusal(url: str | None, dcfg) -> str | None:
    """None when ``url`` may be fetched under ``dcfg`` (a DownloadConfig), else the reason."""
    if url is None or not str(url).strip():
        return "refused: empty URL"
    try:
        parts = urlsplit(fetch_form(url))
        host = parts.hostname
    except ValueError as e:
        return f"refused: malformed URL ({e})"
    scheme = parts.scheme.lower()
    if scheme not in {s.lower() for s in dcfg.allowed_schemes}:
        shown = f"scheme '{scheme[:20]}'" if scheme else "a URL without a scheme"
        return f"refused: {shown} is not fetched (download.allowed_schemes)"
    if not host:
        return "refused: URL has no host" if scheme in NEEDS_HOST else None
    if not dcfg.allow_private_addresses and is_private_host(host):
        return PRIVATE
    return None
