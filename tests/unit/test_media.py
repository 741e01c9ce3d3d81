"""Media fetching: data:, file:// and http(s) against a real local http.server, under MediaPolicy limits."""

from __future__ import annotations

import base64
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from vlm_triton.errors import InvalidRequest
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy, decode_image, is_public_address


def _png(width: int = 32, height: int = 24, color=(200, 30, 60), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


PNG = _png()
BIG = 2 * 1024 * 1024  # bytes the /big endpoints send; the tests cap at 1 MiB


# --------------------------------------------------------------------------------------------------- local server
class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server API)
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif self.path == "/host":
            self._send(200, self.headers.get("Host", "").encode())
        elif self.path == "/text":
            self._send(200, b"hello, not an image", {"Content-Type": "text/plain"})
        elif self.path == "/big":
            self._send(200, b"\0" * BIG)
        elif self.path == "/big-stream":  # no Content-Length: HTTP/1.0, body ends at close
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(BIG // 65536):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif self.path == "/slow":
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not self.server.stopping:
                time.sleep(0.05)
            self._send(200, PNG)
        elif self.path == "/redirect-ok":
            self._send(302, headers={"Location": "/img.png"})
        elif self.path == "/redirect-private":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/redirect-file":
            self._send(302, headers={"Location": "file:///etc/passwd"})
        elif self.path == "/loop":
            self._send(302, headers={"Location": f"http://127.0.0.1:{port}/loop"})
        else:
            self._send(404, b"not found")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stopping = False

    def handle_error(self, request, client_address):  # the client hanging up on /slow or /big is expected
        pass


def _serve(srv: _Server):
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv


def _stop(srv: _Server) -> None:
    srv.stopping = True
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def server():
    srv = _serve(_Server(("127.0.0.1", 0), _Handler))
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _stop(srv)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """HTTPS on 127.0.0.1 with a self-signed certificate for the name 'localhost' only."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    if socket.gethostbyname("localhost") != "127.0.0.1":
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    srv = _Server(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    _serve(srv)
    yield srv.server_address[1], cert
    _stop(srv)


LOOPBACK_OK = MediaPolicy(allow_private_networks=True)


# --------------------------------------------------------------------------------------------------- data:
def test_data_url_image():
    img = MediaFetcher().load_image(_data_url(PNG))
    assert img.mode == "RGB" and img.size == (32, 24) and img.getpixel((0, 0)) == (200, 30, 60)


def test_data_url_whitespace_tolerated_and_rgba_converted():
    encoded = base64.b64encode(_png(mode="RGBA", color=(1, 2, 3, 4))).decode()
    url = "data:image/png;base64," + "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    img = MediaFetcher().load_image(url)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64,@@@notbase64@@@", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(PNG).decode()[:-3], "not valid base64"),  # cut mid-quantum
        ("data:image/png;base64,", "empty payload"),
        ("data:image/png," + "abc", "base64-encoded"),
        ("data:image/png;base64", "malformed data: URL"),
    ],
)
def test_data_url_invalid(url, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        MediaFetcher().fetch_bytes(url)


def test_data_url_truncated_image_fails_on_load():
    cut = PNG[: len(PNG) // 2]
    cut = cut[: len(cut) - len(cut) % 3]  # whole base64 quanta: the base64 is valid, the PNG is not
    with pytest.raises(InvalidRequest, match="truncated or corrupt"):
        MediaFetcher().load_image(_data_url(cut))


def test_data_url_non_image():
    with pytest.raises(InvalidRequest, match="not a supported image; supported formats: JPEG"):
        MediaFetcher().load_image(_data_url(b"hello world, definitely not pixels"))


def test_eps_is_not_decoded():  # EPS would run Ghostscript; it is not in the allowed formats
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InvalidRequest, match="not a supported image"):
        MediaFetcher().load_image(_data_url(eps, "image/eps"))


def test_data_url_size_cap():
    fetcher = MediaFetcher(MediaPolicy(max_bytes=1000))
    with pytest.raises(InvalidRequest, match="1000 byte limit"):
        fetcher.fetch_bytes(_data_url(b"\0" * 5000))
    assert fetcher.fetch_bytes(_data_url(b"\1" * 999)) == b"\1" * 999


def test_pixel_limit():
    fetcher = MediaFetcher(MediaPolicy(max_image_pixels=100 * 100))
    with pytest.raises(InvalidRequest, match=r"200x200 \(40000 pixels\); the limit is 10000 pixels"):
        fetcher.load_image(_data_url(_png(200, 200)))
    assert fetcher.load_image(_data_url(_png(100, 100))).size == (100, 100)


def test_pil_decompression_bomb_is_invalid_request(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises past 2x its own limit
    with pytest.raises(InvalidRequest, match="too many pixels"):
        decode_image(_png(100, 100), policy=MediaPolicy())


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x", "/etc/passwd", "javascript:alert(1)"])
def test_unsupported_scheme_lists_allowed(url):
    with pytest.raises(InvalidRequest, match="allowed schemes: http, https, data$"):
        MediaFetcher().fetch_bytes(url)


# --------------------------------------------------------------------------------------------------- file://
@pytest.fixture()
def media_dirs(tmp_path: Path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    (allowed / "sub").mkdir()
    (tmp_path / "secret.png").write_bytes(_png(color=(0, 0, 0)))
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    return allowed, tmp_path


def test_file_refused_by_default(media_dirs):
    allowed, _ = media_dirs
    with pytest.raises(InvalidRequest, match="file:// URLs are disabled"):
        MediaFetcher().fetch_bytes(f"file://{allowed}/cat.png")


def test_file_allowed_dir(media_dirs):
    allowed, _ = media_dirs
    fetcher = MediaFetcher(MediaPolicy(allowed_local_dirs=(allowed,)))
    assert fetcher.fetch_bytes(f"file://{allowed}/cat.png") == PNG
    assert fetcher.load_image(f"file://localhost{allowed}/cat.png").size == (32, 24)
    assert "file" in fetcher.allowed_schemes()


@pytest.mark.parametrize("suffix", ["/../secret.png", "/sub/../../secret.png", "/%2e%2e/secret.png", "/link.png"])
def test_file_traversal_and_symlink_escape_refused(media_dirs, suffix):
    allowed, _ = media_dirs
    fetcher = MediaFetcher(MediaPolicy(allowed_local_dirs=(allowed,)))
    with pytest.raises(InvalidRequest, match="outside the allowed directories"):
        fetcher.fetch_bytes(f"file://{allowed}{suffix}")


def test_file_other_failures(media_dirs):
    allowed, root = media_dirs
    fetcher = MediaFetcher(MediaPolicy(allowed_local_dirs=(allowed,), max_bytes=10))
    with pytest.raises(InvalidRequest, match="does not exist"):
        fetcher.fetch_bytes(f"file://{allowed}/missing.png")
    with pytest.raises(InvalidRequest, match="not a regular file"):
        fetcher.fetch_bytes(f"file://{allowed}/sub")
    with pytest.raises(InvalidRequest, match="the limit is 10$"):
        fetcher.fetch_bytes(f"file://{allowed}/cat.png")
    with pytest.raises(InvalidRequest, match="must not name a host"):
        fetcher.fetch_bytes(f"file://otherhost{allowed}/cat.png")
    with pytest.raises(InvalidRequest, match="outside the allowed directories"):
        fetcher.fetch_bytes("file:///etc/passwd")


# --------------------------------------------------------------------------------------------------- http(s)://
def test_http_loopback_refused_by_default(server):
    with pytest.raises(InvalidRequest, match=r"private, loopback.*\(127\.0\.0\.1\); only public addresses"):
        MediaFetcher().fetch_bytes(f"{server}/img.png")


def test_http_localhost_name_refused_by_default(server):
    port = server.rsplit(":", 1)[1]
    with pytest.raises(InvalidRequest, match="private, loopback"):
        MediaFetcher().fetch_bytes(f"http://localhost:{port}/img.png")


def test_http_allowed_with_private_networks(server):
    fetcher = MediaFetcher(LOOPBACK_OK)
    assert fetcher.fetch_bytes(f"{server}/img.png") == PNG
    assert fetcher.load_image(f"{server}/img.png").size == (32, 24)
    assert fetcher.fetch_bytes(f"{server}/redirect-ok") == PNG  # relative redirect followed


def test_http_allowed_network_cidr(server):
    assert MediaFetcher(MediaPolicy(allowed_networks=("127.0.0.1/32",))).fetch_bytes(f"{server}/img.png") == PNG


def test_http_redirect_to_private_address_is_rechecked(server):
    fetcher = MediaFetcher(MediaPolicy(allowed_networks=("127.0.0.1/32",)))
    with pytest.raises(InvalidRequest, match=r"169\.254\.169\.254"):
        fetcher.fetch_bytes(f"{server}/redirect-private")


def test_http_redirect_to_other_scheme_refused(server):
    with pytest.raises(InvalidRequest, match="absolute http"):
        MediaFetcher(LOOPBACK_OK).fetch_bytes(f"{server}/redirect-file")


def test_http_redirect_limit(server):
    with pytest.raises(InvalidRequest, match="redirected more than 3 times"):
        MediaFetcher(LOOPBACK_OK).fetch_bytes(f"{server}/loop")


def test_http_timeout(server):
    fetcher = MediaFetcher(MediaPolicy(allow_private_networks=True, timeout_s=0.5))
    start = time.monotonic()
    with pytest.raises(InvalidRequest, match=r"timed out after 0\.5 s"):
        fetcher.fetch_bytes(f"{server}/slow")
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("path", ["/big", "/big-stream"])
def test_http_size_cap(server, path):
    fetcher = MediaFetcher(MediaPolicy(allow_private_networks=True, max_bytes=1024 * 1024))
    with pytest.raises(InvalidRequest, match="limit"):
        fetcher.fetch_bytes(f"{server}{path}")


def test_http_errors(server):
    fetcher = MediaFetcher(LOOPBACK_OK)
    with pytest.raises(InvalidRequest, match="returned HTTP 404"):
        fetcher.fetch_bytes(f"{server}/missing")
    with pytest.raises(InvalidRequest, match="not a supported image"):
        fetcher.load_image(f"{server}/text")
    with pytest.raises(InvalidRequest, match="cannot resolve host|cannot fetch"):
        fetcher.fetch_bytes("http://nonexistent.invalid/a.png")


def test_connection_refused_is_invalid_request():
    fetcher = MediaFetcher(MediaPolicy(allow_private_networks=True, timeout_s=2))
    with pytest.raises(InvalidRequest, match="cannot fetch media URL"):
        fetcher.fetch_bytes("http://127.0.0.1:9/x.png")  # discard port: nothing listens


@pytest.mark.parametrize(
    ("addr", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_is_public_address(addr, public):
    assert is_public_address(ipaddress.ip_address(addr)) is public


def test_http_host_header_is_the_original(server):
    # the connection is pinned to the checked IP; the Host header still names the URL's host
    port = server.rsplit(":", 1)[1]
    fetcher = MediaFetcher(LOOPBACK_OK)
    assert fetcher.fetch_bytes(f"http://localhost:{port}/host") == f"localhost:{port}".encode()


def test_https_pinned_address_keeps_sni_and_certificate_name(tls_server):
    port, cert = tls_server
    policy = MediaPolicy(allowed_networks=("127.0.0.1/32",), ca_bundle=cert, timeout_s=5)
    assert MediaFetcher(policy).fetch_bytes(f"https://localhost:{port}/img.png") == PNG
    # the certificate names 'localhost' only: the bare IP fails verification
    with pytest.raises(InvalidRequest, match="cannot fetch media URL"):
        MediaFetcher(policy).fetch_bytes(f"https://127.0.0.1:{port}/img.png")
    # without the CA the self-signed certificate is refused
    with pytest.raises(InvalidRequest, match="cannot fetch media URL"):
        MediaFetcher(MediaPolicy(allowed_networks=("127.0.0.1/32",), timeout_s=5)).fetch_bytes(
            f"https://localhost:{port}/img.png"
        )
