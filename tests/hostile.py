"""A hostile-input corpus, generated (never downloaded): files, a server, and a URL list."""

from __future__ import annotations

import contextlib
import http.server
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(w=200_000, h=200_000) -> bytes:
    """A tiny PNG whose header declares w x h pixels."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def _zeros_png(w=30_000, h=30_000) -> bytes:
    """A valid, fully decodable 1-bit greyscale PNG of w x h black pixels: ~109 KB for 30000 x 30000,
    900 MB once decoded to 8-bit (the issue's bomb); rows are compressed as they are made."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    row = b"\0" * (1 + (w + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(256, h - i)) for i in range(0, h, 256)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (400, 200), (200, 50, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display -> displayed 200 x 400
    return _jpeg(img, exif=exif.tobytes())


def _gif() -> bytes:
    frames = [Image.new("P", (300, 300), i) for i in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _palette_transparent() -> bytes:
    img = Image.new("P", (300, 300), 0)
    img.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    img.info["transparency"] = 0
    return _png(img)


def _png16() -> bytes:
    arr = (np.linspace(0, 65535, 300 * 300).reshape(300, 300)).astype(np.uint16)
    return _png(Image.fromarray(arr))  # uint16 -> mode I;16


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (10, 100, 200)).save(buf, format="WEBP")
    return buf.getvalue()


def _base(w=320, h=240):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# case -> (path served, payload bytes or None, content type, caption); specials handled by the server
def corpus() -> dict[str, tuple[str, bytes | None, str, str]]:
    good = _jpeg(_base())
    return {
        "truncated_jpeg": ("/f/truncated.jpg", good[: len(good) // 3], "image/jpeg", "a truncated photo"),
        "zero_bytes": ("/f/empty.jpg", b"", "image/jpeg", "an empty file"),
        "html_as_jpeg": ("/f/page.jpg", b"<html><body>hello</body></html>", "image/jpeg", "html pretending"),
        "decompression_bomb": ("/f/bomb.png", _bomb_png(), "image/png", "a bomb"),
        "decompression_bomb_30k": ("/f/bomb30k.png", _zeros_png(), "image/png", "a 30000 x 30000 bomb"),
        "cmyk_jpeg": ("/f/cmyk.jpg", _jpeg(_base().convert("CMYK")), "image/jpeg", "a cmyk photo of noise"),
        "png_16bit": ("/f/16bit.png", _png16(), "image/png", "a sixteen bit gradient"),
        "palette_transparent": ("/f/palette.png", _palette_transparent(), "image/png", "a palette image"),
        "animated_gif": ("/f/anim.gif", _gif(), "image/gif", "an animated gif"),
        "exif_rotated": ("/f/rotated.jpg", _exif_rotated(), "image/jpeg", "a rotated photo"),
        "webp": ("/f/image.webp", _webp(), "image/webp", "a webp image"),
        "one_pixel": ("/f/one.png", _png(Image.new("RGB", (1, 1), "red")), "image/png", "one red pixel"),
        "over_10k_side": ("/f/wide.png", _png(Image.new("RGB", (12_000, 40), "blue")), "image/png", "a wide strip"),
        "caption_empty": ("/f/ok1.jpg", good, "image/jpeg", ""),
        "caption_10k": ("/f/ok2.jpg", good, "image/jpeg", "word " * 2000),
        "caption_bad_utf8": ("/f/ok3.jpg", good, "image/jpeg", "BAD_UTF8"),
        "duplicate_url_a": ("/f/dup.jpg", good, "image/jpeg", "the same url twice (a)"),
        "duplicate_url_b": ("/f/dup.jpg", None, "image/jpeg", "the same url twice (b)"),
        "slow_server": ("/slow/x.jpg", None, "image/jpeg", "a very slow server"),
        "http_429": ("/status/429.jpg", None, "", "rate limited"),
        "http_500": ("/status/500.jpg", None, "", "server error"),
    }


class HostileHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, tuple[bytes, str]] = {}
    slow_seconds = 4.0

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/status/"):
            self.send_error(int(self.path.split("/")[2].split(".")[0]))
            return
        if self.path.startswith("/slow/"):
            time.sleep(self.slow_seconds)
        body, ctype = self.files.get(self.path, (_jpeg(_base()), "image/jpeg"))
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout case)
            self.wfile.write(body)

    def log_message(self, *a):
        pass


def url_list_csv(path: Path, base: str) -> dict[str, int]:
    """Write the URL list (CSV, with one caption that is not valid UTF-8); return case -> row."""
    cases = corpus()
    HostileHandler.files = {p: (b, t) for p, b, t, _ in cases.values() if b is not None}
    lines = [b"URL,TEXT,case"]
    rows = {}
    for i, (case, (p, _, _, cap)) in enumerate(cases.items()):
        cap_b = b"caf\xe9 \xff\xfe broken" if cap == "BAD_UTF8" else cap.encode()
        lines.append(b'"' + (base + p).encode() + b'","' + cap_b.replace(b'"', b'""') + b'",' + case.encode())
        rows[case] = i
    path.write_bytes(b"\n".join(lines) + b"\n")
    return rows
