"""Fetching request-supplied URLs without letting a caller reach the worker's private network
or hold the worker.

A job's URLs are untrusted: unless the operator sets ALLOW_PRIVATE_URLS=1, a host that
resolves to a private, loopback, link-local, multicast or otherwise non-global address is
refused (an IPv6 address that embeds an IPv4 one, as NAT64, 6to4 and IPv4-compatible forms
do, is judged by the IPv4 address), and so is every redirect hop that leads to one. The check
is made twice: on the name before asking (for a clear error), and on the address of each
socket actually connected, before a byte is sent, so a DNS answer that changes in between
(rebinding) gets nowhere. (Through an HTTP proxy the peer is the proxy: a proxy on a private
address needs ALLOW_PRIVATE_URLS=1.) Sizes are capped while reading, not after.

Time is capped too: a ``Deadline`` gives a transfer URL_DEADLINE_S plus the time its bytes
take at URL_MIN_MB_PER_S, and a watchdog shuts its sockets down the moment it falls behind,
whatever it is waiting for (the connection, the headers, the next byte of the body), so a
server that trickles one byte every few seconds cannot hold a job, nor the jobs behind it.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from typing import Iterator
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ..errors import UserInputError

_MAX_REDIRECTS = 5
_CHUNK = 1 << 16
# IPv6 prefixes whose last 32 bits are an IPv4 address the packets go to: NAT64 (RFC 6052's
# well-known prefix, RFC 8215's local-use one) and the deprecated IPv4-compatible ::a.b.c.d.
_EMBEDS_IPV4 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96"))


def is_public(address: str) -> bool:
    """Whether a connection to ``address`` (an IP literal) stays on the public internet."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.is_multicast:
        return False
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in network for network in _EMBEDS_IPV4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(str(embedded))
    return ip.is_global


class PrivateAddress(ConnectionError):
    """A connection reached a non-public address; nothing was sent on it."""


class Deadline:
    """How long one request-supplied transfer may take: ``grace_s``, plus the time its bytes
    take at ``floor`` bytes a second (no floor: ``grace_s`` in all).

    Readers ``count`` what arrives. A watchdog thread, from ``__enter__`` to ``__exit__``,
    decides: as soon as the transfer falls behind, it shuts down every socket the transfer's
    session opened (``track``), which wakes a read blocked on a server that sends nothing;
    the reader then calls ``check`` for the caller's error. Without a limit (``grace_s``
    infinite: a trusted transfer) nothing is watched."""

    _TICK_S = 0.1

    def __init__(self, field: str, grace_s: float, floor: float, what: str = "download"):
        self.field, self.grace_s, self.floor, self.what = field, grace_s, floor, what
        self.received = 0
        self.expired = False
        self._start = time.monotonic()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    @classmethod
    def for_request(cls, field: str, settings) -> Deadline:
        return cls(field, settings.url_deadline_s, settings.url_min_mb_per_s * 1e6)

    @classmethod
    def unlimited(cls, field: str) -> Deadline:
        return cls(field, math.inf, 0)

    def __enter__(self) -> Deadline:
        if math.isfinite(self.grace_s):
            threading.Thread(target=self._watch, name="deadline", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def count(self, n: int) -> None:
        with self._lock:
            self.received += n

    def overdue(self) -> bool:
        allowed = self.grace_s + (self.received / self.floor if self.floor else 0)
        return time.monotonic() - self._start > allowed

    def check(self) -> None:
        """Raise the caller's error if the watchdog cut the transfer: call it where a read
        failed or ended, since a cut connection looks like a dropped or finished one."""
        if self.expired:
            raise self.error()

    def error(self) -> UserInputError:
        elapsed = time.monotonic() - self._start
        if self.what != "download":
            return UserInputError(self.field, f"{self.what} too slow: no answer within {self.grace_s:.0f} s "
                                              "(URL_DEADLINE_S, URL_MIN_MB_PER_S)")
        floor = f" plus its size at {self.floor / 1e6:g} MB/s" if self.floor else ""
        return UserInputError(self.field, f"download too slow ({self.received} bytes in {elapsed:.0f} s); this "
                              f"endpoint allows {self.grace_s:g} s{floor} (URL_DEADLINE_S, URL_MIN_MB_PER_S)")

    def track(self, sock: socket.socket) -> None:
        """Watch a socket of this transfer. A duplicate descriptor is kept, so shutting it down
        reaches the connection even after TLS has taken over the original object."""
        if not math.isfinite(self.grace_s):
            return
        with self._lock:
            self._sockets.append(sock.dup())
        if self.expired:
            self._expire()

    def _watch(self) -> None:
        while not self._done.wait(self._TICK_S):
            if self.overdue():
                self._expire()
                return

    def _expire(self) -> None:
        self.expired = True
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _CheckedConnection:
    """Each new socket: its peer checked (``public_only``), then watched by ``deadline``."""

    public_only = False
    deadline: Deadline | None = None

    def _new_conn(self):
        sock = super()._new_conn()
        if self.public_only:
            peer = sock.getpeername()[0]
            if not is_public(peer):
                sock.close()
                raise PrivateAddress(peer)
        if self.deadline is not None:
            self.deadline.track(sock)
        return sock


def _pool_classes(public_only: bool, deadline: Deadline | None) -> dict:
    def pool(pool_class, connection_class):
        checked = type(connection_class.__name__, (_CheckedConnection, connection_class),
                       {"public_only": public_only, "deadline": deadline})
        return type(pool_class.__name__, (pool_class,), {"ConnectionCls": checked})

    return {"http": pool(HTTPConnectionPool, HTTPConnection), "https": pool(HTTPSConnectionPool, HTTPSConnection)}


class CheckedAdapter(requests.adapters.HTTPAdapter):
    """Connections only to public addresses (unless ``public_only`` is false), checked on the
    connected socket, and each watched by ``deadline`` when there is one."""

    def __init__(self, public_only: bool = True, deadline: Deadline | None = None, **kwargs):
        self._pools = _pool_classes(public_only, deadline)
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools connect through their own classes
            manager.pool_classes_by_scheme = self._pools
        return manager


def session_for(allow_private: bool, pool_size: int = 10, deadline: Deadline | None = None) -> requests.Session:
    """A requests session; unless ``allow_private``, one that connects to public addresses
    only; with a ``deadline``, one whose every connection that deadline can cut."""
    session = requests.Session()
    adapter = CheckedAdapter(public_only=not allow_private, deadline=deadline, pool_maxsize=pool_size)
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
    if not all(is_public(info[4][0]) for info in infos):
        raise UserInputError(field, private_message(parts.hostname))


def private_message(host: str) -> str:
    return f"host {host!r} is a private address; the operator must set ALLOW_PRIVATE_URLS=1"


def open_url(
    session: requests.Session, url: str, field: str, *, allow_private: bool, timeout: float,
    headers: dict | None = None, deadline: Deadline | None = None,
) -> requests.Response:
    """GET ``url`` streaming, following redirects only to hosts ``check_url`` accepts at each hop.

    The response's ``url`` is where the body came from (reuse it for ranged requests)."""
    for _ in range(_MAX_REDIRECTS + 1):
        check_url(url, field, allow_private)
        try:
            response = session.get(url, stream=True, allow_redirects=False, timeout=timeout, headers=headers)
        except requests.RequestException as exc:
            if deadline is not None:
                deadline.check()
            if caused_by(exc, PrivateAddress):
                raise UserInputError(field, private_message(urlsplit(url).hostname)) from None
            raise UserInputError(field, f"download failed ({type(exc).__name__})") from None
        if not response.is_redirect:
            return response
        response.close()
        url = urljoin(url, response.headers["location"])
    raise UserInputError(field, f"more than {_MAX_REDIRECTS} redirects")


def read_body(response: requests.Response, deadline: Deadline, block: int) -> Iterator[bytes]:
    """``response``'s body in pieces of ``block`` bytes, counted against ``deadline``; a body
    the deadline cut short raises its error instead of ending early."""
    try:
        for piece in response.iter_content(block):
            deadline.count(len(piece))
            yield piece
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        deadline.check()
        raise
    deadline.check()


def fetch_bytes(url: str, field: str, *, max_bytes: int, settings) -> bytes:
    """GET ``url`` (following checked redirects) and return at most ``max_bytes`` of body,
    within the request's deadline."""
    allow_private = settings.allow_private_urls
    with Deadline.for_request(field, settings) as deadline, \
            session_for(allow_private, deadline=deadline) as session:
        response = open_url(session, url, field, allow_private=allow_private, timeout=settings.url_timeout_s,
                            deadline=deadline)
        with response:
            if response.status_code != 200:
                raise UserInputError(field, f"download failed (HTTP {response.status_code})")
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise UserInputError(field, f"download is {declared} bytes, over the {max_bytes} allowed")
            body = bytearray()
            try:
                for piece in read_body(response, deadline, _CHUNK):
                    body += piece
                    if len(body) > max_bytes:
                        raise UserInputError(field, f"download is over the {max_bytes} bytes allowed")
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
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
