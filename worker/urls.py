"""Fetching request-supplied URLs without letting a caller reach the worker's private network.

A job's URLs are untrusted: unless the operator sets ALLOW_PRIVATE_URLS=1, a host that
resolves to a private, loopback, link-local or otherwise non-global address is refused, and
so is every redirect hop that leads to one. The check is made twice: on the name before
asking (for a clear error), and on the address of each socket actually connected, before a
byte is sent, so a DNS answer that changes in between (rebinding) gets nowhere. (Through an
HTTP proxy the peer is the proxy: a proxy on a private address needs ALLOW_PRIVATE_URLS=1.)
Sizes are capped while reading, not after.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .errors import UserInputError

_MAX_REDIRECTS = 5
_CHUNK = 1 << 16


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_global


class PrivateAddress(ConnectionError):
    """A connection reached a non-public address; nothing was sent on it."""


class _PublicPeerOnly:
    def _new_conn(self):
        sock = super()._new_conn()
        peer = sock.getpeername()[0]
        if not _is_public(peer):
            sock.close()
            raise PrivateAddress(peer)
        return sock


class _PublicHTTPConnection(_PublicPeerOnly, HTTPConnection):
    pass


class _PublicHTTPSConnection(_PublicPeerOnly, HTTPSConnection):
    pass


class _PublicHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PublicHTTPConnection


class _PublicHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PublicHTTPSConnection


class PublicOnlyAdapter(requests.adapters.HTTPAdapter):
    """Connections only to public addresses, checked on the connected socket."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PublicHTTPPool, "https": _PublicHTTPSPool}


def session_for(allow_private: bool, pool_size: int = 10) -> requests.Session:
    """A requests session; unless ``allow_private``, one that connects to public addresses only."""
    session = requests.Session()
    adapter_class = requests.adapters.HTTPAdapter if allow_private else PublicOnlyAdapter
    adapter = adapter_class(pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def check_url(url: str, field: str, allow_private: bool) -> None:
    """Raise UserInputError(field) unless ``url`` is http(s) and, if required, public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserInputError(field, "must be an http:// or https:// URL with a host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UserInputError(field, f"cannot resolve host {parts.hostname!r}") from None
    if not all(_is_public(info[4][0]) for info in infos):
        raise UserInputError(field, private_message(parts.hostname))


def private_message(host: str) -> str:
    return f"host {host!r} is a private address; the operator must set ALLOW_PRIVATE_URLS=1"


def open_url(
    session: requests.Session, url: str, field: str, *, allow_private: bool, timeout: float, headers: dict | None = None
) -> requests.Response:
    """GET ``url`` streaming, following redirects only to hosts ``check_url`` accepts at each hop.

    The response's ``url`` is where the body came from (reuse it for ranged requests)."""
    for _ in range(_MAX_REDIRECTS + 1):
        check_url(url, field, allow_private)
        try:
            response = session.get(url, stream=True, allow_redirects=False, timeout=timeout, headers=headers)
        except requests.RequestException as exc:
            if caused_by(exc, PrivateAddress):
                raise UserInputError(field, private_message(urlsplit(url).hostname)) from None
            raise UserInputError(field, f"download failed ({type(exc).__name__})") from None
        if not response.is_redirect:
            return response
        response.close()
        url = urljoin(url, response.headers["location"])
    raise UserInputError(field, f"more than {_MAX_REDIRECTS} redirects")


def fetch_bytes(url: str, field: str, *, max_bytes: int, timeout: float, allow_private: bool) -> bytes:
    """GET ``url`` (following checked redirects) and return at most ``max_bytes`` of body."""
    with session_for(allow_private) as session:
        response = open_url(session, url, field, allow_private=allow_private, timeout=timeout)
        with response:
            if response.status_code != 200:
                raise UserInputError(field, f"download failed (HTTP {response.status_code})")
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise UserInputError(field, f"download is {declared} bytes, over the {max_bytes} allowed")
            body = bytearray()
            try:
                for chunk in response.iter_content(_CHUNK):
                    body += chunk
                    if len(body) > max_bytes:
                        raise UserInputError(field, f"download is over the {max_bytes} bytes allowed")
            except requests.RequestException as exc:
                raise UserInputError(field, f"download failed ({type(exc).__name__})") from None
            return bytes(body)


def caused_by(exc: BaseException, kind: type) -> bool:
    """Whether ``kind`` is anywhere in the chain of causes (requests and urllib3 wrap errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind) or any(isinstance(arg, kind) for arg in getattr(exc, "args", ())):
            return True
        seen.add(id(exc))
        exc = getattr(exc, "reason", None) or exc.__cause__ or exc.__context__
    return False
