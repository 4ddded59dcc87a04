"""Downloading an image over http(s), safe to point at untrusted URLs.

stdlib urllib with: http and https only (also on every redirect hop), a socket
timeout and an overall deadline, a byte cap, credentials in the URL sent as
Basic auth but never on to a redirect's target, and, with
`allow_private_urls=False`, no connection to a host that resolves to a
loopback, private, link-local, reserved or multicast address. That check runs
when each connection is made, so it covers every redirect and DNS answers that
change between a check and the connection; no proxy is used then, since the
connection must go to the checked address itself.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import ImageError, ImageTooLargeError


def shorten(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def redact(url: str) -> str:
    """The URL without a password, fit for an error message."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username}:***@" + parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


class _PrivateAddressError(OSError):
    """A URL host resolves to an address that allow_private_urls=False refuses."""


def _is_public_address(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 scope id
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_reserved
        or addr.is_multicast
        or addr.is_unspecified
    )


def _create_public_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *args):
    """socket.create_connection that first checks EVERY resolved address, then connects to those."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        if not _is_public_address(sockaddr[0]):
            raise _PrivateAddressError(f"host {host!r} resolves to non-public address {sockaddr[0]}")
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"cannot resolve {host!r}")


class _PublicHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _create_public_connection


class _PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_PublicHTTPConnection, req)


_HAS_SSL = hasattr(http.client, "HTTPSConnection")  # False on a Python built without ssl
if _HAS_SSL:

    class _PublicHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = _create_public_connection

    class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(_PublicHTTPSConnection, req, context=self._context)


class _HTTPOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects (as the original's httpx does), but never off http/https."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to unsupported scheme {scheme!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(allow_private_urls: bool) -> urllib.request.OpenerDirector:
    # Built by hand: only http(s), no file:/ftp:/data: handlers that a redirect could reach.
    opener = urllib.request.OpenerDirector()
    if allow_private_urls:
        handlers = [urllib.request.ProxyHandler(), urllib.request.HTTPHandler()]  # proxies from the environment
        handlers += [urllib.request.HTTPSHandler()] if _HAS_SSL else []
    else:
        handlers = [_PublicHTTPHandler()]
        handlers += [_PublicHTTPSHandler()] if _HAS_SSL else []
    handlers += [
        urllib.request.HTTPDefaultErrorHandler(),
        _HTTPOnlyRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ]
    for h in handlers:
        opener.add_handler(h)
    return opener


def fetch(url: str, name: str, *, timeout: float, max_bytes: int, allow_private_urls: bool) -> bytes:
    """GET `url`: http(s) only, a socket timeout, an overall deadline, a byte cap. Errors name `name`."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks brackets, .port the port number; both raise ValueError
    except ValueError as e:
        raise ImageError(f"{name}: malformed URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ImageError(f"{name}: unsupported scheme {parts.scheme!r} (only http and https)")
    if not parts.hostname:
        raise ImageError(f"{name}: no host in URL")
    request = urllib.request.Request(
        urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])),
        headers={"User-Agent": "m0lite", "Accept": "image/*, */*;q=0.5"},
    )
    if parts.username is not None:  # user:password@host becomes Basic auth, as httpx does
        userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        # "unredirected": never sent on to wherever a redirect points.
        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(userinfo.encode()).decode())
    deadline = time.monotonic() + timeout
    try:
        with _opener(allow_private_urls).open(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.strip().isdigit() and int(length) > max_bytes:
                raise ImageTooLargeError(f"{name}: Content-Length {int(length)} bytes, over the limit of {max_bytes}")
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise ImageError(f"{name}: download timed out after {timeout:g} s")
                # read1: at most one blocking socket read, so the deadline is checked often.
                chunk = resp.read1(min(1 << 16, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise ImageTooLargeError(f"{name}: body over the limit of {max_bytes} bytes")
            return b"".join(chunks)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        e.close()
        raise ImageError(f"{name}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, _PrivateAddressError):
            raise ImageError(f"{name}: refused, {reason} (allow_private_urls=False)") from None
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise ImageError(f"{name}: timed out after {timeout:g} s") from None
        raise ImageError(f"{name}: cannot fetch ({reason})") from None
    except (TimeoutError, socket.timeout):
        raise ImageError(f"{name}: timed out after {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ImageError(f"{name}: download failed ({type(e).__name__}: {e})") from None
