"""Fetching request-supplied URLs without letting a caller reach the worker's private network.

A job's URLs are untrusted: unless the operator sets ALLOW_PRIVATE_URLS=1, a host that
resolves to a private, loopback, link-local or otherwise non-global address is refused, and
so is every redirect hop that leads to one. Sizes are capped while reading, not after.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import requests

from .errors import UserInputError

_MAX_REDIRECTS = 5
_CHUNK = 1 << 16


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
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        if not (mapped or address).is_global:
            raise UserInputError(
                field, f"host {parts.hostname!r} is a private address; the operator must set ALLOW_PRIVATE_URLS=1"
            )


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
            raise UserInputError(field, f"download failed ({type(exc).__name__})") from None
        if not response.is_redirect:
            return response
        response.close()
        url = urljoin(url, response.headers["location"])
    raise UserInputError(field, f"more than {_MAX_REDIRECTS} redirects")


def fetch_bytes(url: str, field: str, *, max_bytes: int, timeout: float, allow_private: bool) -> bytes:
    """GET ``url`` (following checked redirects) and return at most ``max_bytes`` of body."""
    with requests.Session() as session:
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
