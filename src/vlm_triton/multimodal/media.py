"""Fetching request media (image/video URLs) safely.

Supported URL schemes:

- `data:<mime>;base64,<payload>`: strictly validated base64 (whitespace ignored, padding required); the
  decoded size is capped before decoding.
- `http://`, `https://`: fetched with httpx, streaming, with the byte cap enforced while streaming and one
  overall deadline (`timeout_s`) for the whole fetch including redirects. Every hop's host is resolved and
  **all** its addresses must be public (not private, loopback, link-local, CGNAT, multicast, reserved or
  unspecified, IPv4-mapped/6to4/Teredo forms included) unless `allow_private_networks` is set or the address
  is inside `allowed_networks`. The connection is then pinned to the address that was checked (the URL is
  rewritten to the IP with the original Host header and TLS SNI/certificate name), so DNS rebinding cannot
  swap in another address. Redirects are followed by hand (at most `max_redirects`) and each hop is
  re-checked. Proxy environment variables are ignored (`trust_env=False`): a proxy would bypass these checks.
  DNS resolution itself is not bounded by the timeout (it uses the system resolver).
- `file://`: refused unless `allowed_local_dirs` is set; the path is resolved (symlinks, `..`) and must lie
  inside one of those directories and be a regular file.

`load_image` decodes with Pillow restricted to `image_formats` (so, e.g., EPS never reaches Ghostscript),
checks the pixel count against `max_image_pixels` from the header before decoding, calls `Image.load()` so a
truncated file fails here, and returns an RGB image (`convert('RGB')` as the InternVL reference does: alpha is
dropped, EXIF orientation is not applied).

Every client-side problem raises `InvalidRequest` with a message that says what was wrong and what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import ssl
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image

from vlm_triton.errors import InvalidRequest, SetupError

MiB = 1024 * 1024
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO


@dataclass(frozen=True)
class MediaPolicy:
    """What the media fetcher may do. The defaults are safe for a public endpoint."""

    allowed_local_dirs: tuple[Path, ...] = ()  # empty: file:// refused
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()  # CIDRs reachable even though private, e.g. an internal image store
    max_bytes: int = 20 * MiB
    max_image_pixels: int = 8192 * 8192
    timeout_s: float = 10.0
    max_redirects: int = 3
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
    ca_bundle: Path | None = None  # extra PEM CA file for https (e.g. an internal store); None: system CAs
    user_agent: str = "vlm-triton-media-fetcher"


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


def _embedded_ipv4(addr: IPAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(addr, ipaddress.IPv6Address):
        return []
    found = [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
    if addr.teredo is not None:
        found.extend(addr.teredo)
    return found


def is_public_address(addr: IPAddress) -> bool:
    """True when `addr` (and any IPv4 address embedded in it) is a globally routable unicast address."""
    for a in [addr, *_embedded_ipv4(addr)]:
        if (
            not a.is_global
            or a.is_private
            or a.is_loopback
            or a.is_link_local
            or a.is_multicast
            or a.is_reserved
            or a.is_unspecified
        ):
            return False
    return True


class MediaFetcher:
    """Fetches media bytes / images from request URLs under a `MediaPolicy`."""

    def __init__(self, policy: MediaPolicy | None = None) -> None:
        self.policy = policy or MediaPolicy()
        self._allowed_dirs = tuple(Path(d).resolve() for d in self.policy.allowed_local_dirs)
        self._allowed_nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.policy.allowed_networks)

    # ----------------------------------------------------------------------------------------------- public
    def allowed_schemes(self) -> tuple[str, ...]:
        return ("http", "https", "data") + (("file",) if self._allowed_dirs else ())

    def fetch_bytes(self, url: str) -> bytes:
        """The raw bytes behind `url` (data:, http(s):, or allow-listed file:)."""
        if not isinstance(url, str) or not url.strip():
            raise InvalidRequest("media URL must be a non-empty string")
        url = url.strip()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._fetch_data(url)
        if scheme in ("http", "https"):
            return self._fetch_http(url)
        if scheme == "file":
            return self._fetch_file(url)
        raise InvalidRequest(
            f"unsupported media URL scheme {scheme or '(none)'!r} in {_short(url)!r}; "
            f"allowed schemes: {', '.join(self.allowed_schemes())}"
        )

    def load_image(self, url: str) -> Image.Image:
        """Fetch and decode an image; returns a fully loaded RGB `PIL.Image`."""
        return load_rgb(*self.open_image(url))

    def open_image(self, url: str) -> tuple[Image.Image, str]:
        """Fetch an image and read its header only (format and pixel limit checked): (the lazy image, a name for
        errors). `load_rgb` decodes its pixels."""
        data = self.fetch_bytes(url)
        source = "image in data: URL" if url.strip()[:5].lower() == "data:" else f"image {_short(url.strip())!r}"
        return open_image_bytes(data, policy=self.policy, source=source), source

    # ----------------------------------------------------------------------------------------------- data:
    def _fetch_data(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise InvalidRequest("malformed data: URL (no ','); expected data:<mime>;base64,<payload>")
        params = [p.strip().lower() for p in header[len("data:") :].split(";")]
        if "base64" not in params[1:]:
            raise InvalidRequest("data: URLs must be base64-encoded; expected data:<mime>;base64,<payload>")
        compact = "".join(payload.split())
        if len(compact) // 4 * 3 > self.policy.max_bytes + 3:
            raise InvalidRequest(f"data: URL payload is larger than the {self.policy.max_bytes} byte limit")
        if not compact:
            raise InvalidRequest("data: URL has an empty payload")
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"data: URL payload is not valid base64 ({exc}); it may be truncated") from None
        if len(data) > self.policy.max_bytes:
            raise InvalidRequest(f"data: URL payload is {len(data)} bytes; the limit is {self.policy.max_bytes}")
        return data

    # ----------------------------------------------------------------------------------------------- file:
    def _fetch_file(self, url: str) -> bytes:
        if not self._allowed_dirs:
            raise InvalidRequest(
                "file:// URLs are disabled on this server; send the media as a data: URL or an http(s) URL"
            )
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidRequest(f"file:// URL must not name a host ({parts.netloc!r}); use file:///absolute/path")
        raw = unquote(parts.path)
        if "\x00" in raw or not raw.startswith("/"):
            raise InvalidRequest("file:// URL must hold an absolute path, e.g. file:///data/images/cat.png")
        path = Path(raw).resolve()  # follows symlinks and removes '..'
        if not any(path.is_relative_to(d) for d in self._allowed_dirs):
            raise InvalidRequest(
                f"file path {raw!r} is outside the allowed directories "
                f"({', '.join(str(d) for d in self._allowed_dirs)})"
            )
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise InvalidRequest(f"file {raw!r} does not exist") from None
        except OSError as exc:
            raise InvalidRequest(f"file {raw!r} cannot be read ({exc.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidRequest(f"file {raw!r} is not a regular file")
            if info.st_size > self.policy.max_bytes:
                raise InvalidRequest(f"file {raw!r} is {info.st_size} bytes; the limit is {self.policy.max_bytes}")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(self.policy.max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > self.policy.max_bytes:
            raise InvalidRequest(f"file {raw!r} is larger than the {self.policy.max_bytes} byte limit")
        return data

    # ----------------------------------------------------------------------------------------------- http(s):
    def _address_allowed(self, addr: IPAddress) -> bool:
        if self.policy.allow_private_networks or is_public_address(addr):
            return True
        return any(addr in net for net in self._allowed_nets if net.version == addr.version)

    def _resolve_checked(self, host: str, port: int, url: str) -> IPAddress:
        """Resolve `host` and return an address to connect to; refuse when any address is not allowed."""
        try:
            addrs: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise InvalidRequest(f"cannot resolve host {host!r} of media URL {_short(url)!r} ({exc})") from None
            addrs = []
            for info in infos:
                addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if addr not in addrs:
                    addrs.append(addr)
            if not addrs:
                raise InvalidRequest(f"host {host!r} of media URL {_short(url)!r} has no addresses")
        refused = [a for a in addrs if not self._address_allowed(a)]
        if refused:
            raise InvalidRequest(
                f"media URL {_short(url)!r} points to a private, loopback, link-local or reserved address "
                f"({refused[0]}); only public addresses are allowed"
            )
        return addrs[0]

    def _fetch_http(self, url: str) -> bytes:
        policy = self.policy
        deadline = time.monotonic() + policy.timeout_s
        timed_out = InvalidRequest(f"fetching media URL {_short(url)!r} timed out after {policy.timeout_s:g} s")
        current = url
        verify: ssl.SSLContext | bool = True
        if policy.ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(policy.ca_bundle))
        with httpx.Client(trust_env=False, follow_redirects=False, verify=verify) as client:
            for _hop in range(policy.max_redirects + 1):
                try:
                    target = httpx.URL(current)
                except (httpx.InvalidURL, ValueError) as exc:
                    raise InvalidRequest(f"malformed media URL {_short(current)!r} ({exc})") from None
                if target.scheme not in ("http", "https") or not target.host:
                    raise InvalidRequest(
                        f"media URL {_short(current)!r} must be an absolute http(s) URL with a host"
                    )
                port = target.port or (443 if target.scheme == "https" else 80)
                addr = self._resolve_checked(target.host, port, current)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise timed_out
                headers = {"Host": target.netloc.decode("ascii"), "User-Agent": policy.user_agent}
                extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
                request = client.build_request(
                    "GET",
                    target.copy_with(host=str(addr)),
                    headers=headers,
                    timeout=httpx.Timeout(remaining),
                    extensions=extensions,
                )
                try:
                    response = client.send(request, stream=True)
                except httpx.TimeoutException:
                    raise timed_out from None
                except httpx.HTTPError as exc:
                    raise InvalidRequest(f"cannot fetch media URL {_short(current)!r} ({exc})") from None
                try:
                    if response.is_redirect:  # a 3xx redirect status with a Location header
                        current = urljoin(current, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise InvalidRequest(
                            f"fetching media URL {_short(current)!r} returned HTTP {response.status_code}"
                        )
                    return self._read_capped(response, current, deadline, timed_out)
                finally:
                    response.close()
        raise InvalidRequest(
            f"media URL {_short(url)!r} redirected more than {policy.max_redirects} times "
            f"(the limit is {policy.max_redirects})"
        )

    def _read_capped(
        self, response: httpx.Response, url: str, deadline: float, timed_out: InvalidRequest
    ) -> bytes:
        cap = self.policy.max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            raise InvalidRequest(f"media URL {_short(url)!r} is {int(declared)} bytes; the limit is {cap}")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > cap:
                    raise InvalidRequest(f"media URL {_short(url)!r} is larger than the {cap} byte limit")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise timed_out
        except httpx.TimeoutException:
            raise timed_out from None
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"reading media URL {_short(url)!r} failed ({exc})") from None
        return b"".join(chunks)


def decode_image(data: bytes, *, policy: MediaPolicy | None = None, source: str = "image") -> Image.Image:
    """Decode image bytes into a loaded RGB image under `policy` (formats, pixel limit, truncation)."""
    return load_rgb(open_image_bytes(data, policy=policy, source=source), source)


def open_image_bytes(data: bytes, *, policy: MediaPolicy | None = None, source: str = "image") -> Image.Image:
    """Image bytes -> a lazy `PIL.Image` whose header passed `policy` (formats, pixel limit); nothing decoded yet."""
    policy = policy or MediaPolicy()
    formats = ", ".join(policy.image_formats)
    Image.init()
    usable = [f.upper() for f in policy.image_formats if f.upper() in Image.OPEN]
    if not usable:
        raise SetupError(f"none of the configured image formats ({formats}) is supported by this Pillow")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(io.BytesIO(data), formats=usable)
    except Image.DecompressionBombError:
        raise InvalidRequest(
            f"{source}: the image has too many pixels; the limit is {policy.max_image_pixels}"
        ) from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidRequest(f"{source}: the data is not a supported image; supported formats: {formats}") from None
    width, height = img.size
    if width < 1 or height < 1 or width * height > policy.max_image_pixels:
        raise InvalidRequest(
            f"{source}: the image is {width}x{height} ({width * height} pixels); "
            f"the limit is {policy.max_image_pixels} pixels"
        )
    return img


def load_rgb(img: Image.Image, source: str = "image") -> Image.Image:
    """Decode an opened image (`open_image_bytes`): the loaded RGB image; a truncated or corrupt file fails here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"{source}: the image is truncated or corrupt ({exc})") from None
