"""Request URLs: which addresses they may reach, and how long a download may hold the worker.

The address check is tested on IP literals, resolved without the network and never connected
to: on a machine with an IPv6 route those packets would leave it. The deadlines are tested
against real servers on loopback that trickle, stall or dawdle.
"""

from __future__ import annotations

import os
import re
import time
from http.server import BaseHTTPRequestHandler

import pytest

from tests.helpers import Loopback, png_b64
from worker.errors import UserInputError
from worker.settings import Settings
from worker.sources.urls import check_url, fetch_bytes, is_public

PRIVATE = [
    "127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:127.0.0.1", "fe80::1",
    "64:ff9b::7f00:1",  # NAT64 (RFC 6052) of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254, the cloud metadata service
    "64:ff9b:1::a00:1",  # RFC 8215's local-use NAT64 prefix, of 10.0.0.1
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "::127.0.0.1", "::10.0.0.1", "::",  # IPv4-compatible
    "224.0.0.1", "239.255.255.250", "233.252.0.1",  # multicast (SSDP among them)
    "ff02::1", "ff0e::1",  # IPv6 multicast, link and global scope
]
PUBLIC = ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", PRIVATE)
def test_private_and_embedded_private_addresses_are_not_public(address):
    assert not is_public(address)
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(UserInputError, match=r"^image: host .* is a private address"):
        check_url(f"http://{host}/x.png", "image", allow_private=False)  # resolves the literal, connects nowhere


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_and_their_embedded_forms_are_public(address):
    assert is_public(address)


# --- Deadlines: servers that hold a download ---


class Slow(Loopback):
    """A loopback server that misbehaves slowly: ``trickle`` sends headers, then the body a
    byte every ``every_s``; ``headers`` dribbles the status line and headers themselves;
    ``silent`` accepts and says nothing; ``steady`` sends ``rate`` bytes a second in 1 KiB
    pieces. Every mode declares ``size`` bytes of body."""

    def __init__(self, mode: str, size: int = 100_000, every_s: float = 0.2, rate: int = 50_000):
        self.served = 0

        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                try:
                    self._serve()
                except OSError:  # the worker gave up on us
                    pass

            def _serve(self):
                outer.served += 1
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()
                if mode == "silent":
                    time.sleep(20)
                    return
                if mode == "headers":
                    for byte in head:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(every_s)
                    return
                self.wfile.write(head)
                if mode == "trickle":
                    for _ in range(size):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(every_s)
                else:  # steady
                    for _ in range(0, size, 1024):
                        self.wfile.write(b"x" * 1024)
                        self.wfile.flush()
                        time.sleep(1024 / rate)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def tight(tmp_path, **fields) -> Settings:
    return Settings(**{"models_dir": tmp_path / "models", "allow_private_urls": True, "hf_hub_offline": True,
                       "url_deadline_s": 1, "url_min_mb_per_s": 1} | fields)


@pytest.mark.parametrize("mode", ["trickle", "headers", "silent"])
def test_a_server_that_trickles_or_stalls_is_cut_at_the_deadline(tmp_path, mode):
    server = Slow(mode)
    try:
        start = time.monotonic()
        with pytest.raises(UserInputError, match=r"^image: download too slow \(\d+ bytes in 1 s\); this endpoint "
                                                 r"allows 1 s plus its size at 1 MB/s \(URL_DEADLINE_S"):
            fetch_bytes(server.url + "/x.png", "image", max_bytes=10**6, settings=tight(tmp_path))
        # Cut when it fell behind, not after URL_TIMEOUT_S (30 s) of silence nor at the body's end.
        assert time.monotonic() - start < 3
    finally:
        server.close()


def test_without_a_floor_the_whole_download_has_url_deadline_s(tmp_path):
    server = Slow("steady", size=200_000, rate=100_000)  # 2 s at a steady pace
    try:
        with pytest.raises(UserInputError, match=r"^image: download too slow .* allows 1 s \(URL_DEADLINE_S"):
            fetch_bytes(server.url + "/x.png", "image", max_bytes=10**6, settings=tight(tmp_path, url_min_mb_per_s=0))
        assert len(fetch_bytes(server.url + "/x.png", "image", max_bytes=10**6,
                               settings=tight(tmp_path, url_deadline_s=10, url_min_mb_per_s=0))) == 200_000
    finally:
        server.close()


def test_a_big_download_gets_time_for_its_size_at_the_floor(tmp_path):
    """1 s plus 300 kB at 0.1 MB/s is 4 s: a steady 150 kB/s download of 300 kB (2 s) finishes."""
    server = Slow("steady", size=300_000, rate=150_000)
    try:
        body = fetch_bytes(server.url + "/x.png", "image", max_bytes=10**6,
                           settings=tight(tmp_path, url_min_mb_per_s=0.1))
        assert len(body) == 300_000
    finally:
        server.close()


@pytest.fixture(scope="module")
def slow_engine(models_dir):
    """An engine whose request downloads have 1 s, plus their size at 1 MB/s."""
    from worker.engine import Engine

    return Engine(Settings(models_dir=models_dir, allow_private_urls=True, hf_hub_offline=True,
                           url_deadline_s=1, url_min_mb_per_s=1))


@pytest.mark.parametrize("field, request_fields", [
    ("image", lambda url: {"image": url + "/in.png"}),
    ("mask_image", lambda url: {"image": png_b64(), "mask_image": url + "/mask.png"}),
    ("loras[0].url", lambda url: {"loras": [{"url": url + "/style.safetensors"}]}),
    ("embeddings[0].url", lambda url: {"embeddings": [{"url": url + "/word.safetensors"}]}),
    ("vae.url", lambda url: {"vae": {"url": url + "/vae.safetensors"}}),
    ("controlnets[0].url", lambda url: {"controlnets": [{"url": url + "/cn.safetensors", "image": png_b64()}]}),
    ("model.url", lambda url: {"model": {"url": url + "/model.tar.zst"}}),
    ("model.checkpoint_url", lambda url: {"model": {"checkpoint_url": url + "/model.safetensors"}}),
])
def test_every_request_download_has_a_deadline_naming_its_field(slow_engine, field, request_fields):
    from schemas import InferenceRequest

    server = Slow("trickle")
    try:
        fields = {"prompt": "p", "num_inference_steps": 2} | request_fields(server.url)
        request = InferenceRequest.model_validate(fields)
        start = time.monotonic()
        with pytest.raises(UserInputError, match=rf"^{re.escape(field)}: download too slow"):
            slow_engine.generate(request, lambda event: None, lambda: False)
        assert time.monotonic() - start < 5
    finally:
        server.close()
    # The worker serves the next job.
    plain = InferenceRequest.model_validate({"prompt": "p", "num_inference_steps": 2})
    assert slow_engine.generate(plain, lambda event: None, lambda: False).images


def test_sockets_of_a_cut_download_are_let_go(tmp_path):
    """What the deadline keeps to cut a download (a duplicate of each socket) goes with it."""
    server = Slow("trickle")
    try:
        before = _open_sockets()
        for _ in range(3):
            with pytest.raises(UserInputError):
                fetch_bytes(server.url + "/x.png", "image", max_bytes=10**6, settings=tight(tmp_path))
        deadline = time.monotonic() + 3  # (the server's side closes at its next write)
        while _open_sockets() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _open_sockets() <= before
    finally:
        server.close()


def _open_sockets() -> int:
    fds = os.listdir("/proc/self/fd")
    count = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count

