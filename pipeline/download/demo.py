"""Built-in demo data: procedurally generated LAION-style rows, served on loopback.

``build_demo(folder, n)`` writes images, a ground-truth table (its ``duplicate_of``
column names the row an exact duplicate copies, ``near_duplicate_of`` the row a re-encoded or
resized copy was made from) and a URL-list template. ``serve_demo(folder)`` starts an HTTP server on 127.0.0.1 (a
port stable per folder) and yields the URL-list parquet with that server's address in it, so
img2dataset downloads the demo for real. Nothing touches the network beyond
loopback.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from t2i_curate.pipeline.core.io import atomic_path, write_parquet

log = logging.getLogger(__name__)

GROUND_TRUTH = "ground_truth.parquet"
SUBJECTS = [
    "a red barn in a snowy field", "a bowl of ramen on a wooden table", "portrait of an old fisherman",
    "a horse galloping on the beach", "a city skyline at night", "a cat sleeping on a windowsill",
    "mountain lake at sunrise", "a vintage car parked on a street", "a plate of fresh sushi",
    "children playing football in a park", "an abstract oil painting", "a lighthouse in a storm",
    "a bouquet of sunflowers", "a woman riding a bicycle", "a forest path in autumn",
    "a cup of coffee with latte art", "a desert with sand dunes", "a dog catching a frisbee",
]
STYLES = ["photo", "stock photo", "illustration", "watercolor", "digital art", "close-up photo"]
WATERMARK_TEXTS = ["shutterstock", "© istock", "alamy", "dreamstime", "PREVIEW", "© getty images"]


def _size_plan(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """Sizes with known proportions: small, mid (512-1024), large (>1024), extreme aspect."""
    sizes = []
    for i in range(n):
        r = i % 20
        if r < 2:  # 10% under 256 px
            sizes.append((int(rng.integers(64, 250)), int(rng.integers(64, 250))))
        elif r < 12:  # 50% between 512 and 1024 on both sides
            sizes.append((int(rng.integers(512, 1025)), int(rng.integers(512, 1025))))
        elif r < 15:  # 15% over 1024 on both sides
            sizes.append((int(rng.integers(1040, 1500)), int(rng.integers(1040, 1500))))
        elif r < 17:  # 10% extreme aspect ratios (> 3:1)
            long, short = int(rng.integers(900, 1400)), int(rng.integers(120, 280))
            sizes.append((long, short) if r == 15 else (short, long))
        else:  # 15% between 256 and 512
            sizes.append((int(rng.integers(256, 512)), int(rng.integers(256, 512))))
    return sizes


def _draw_image(rng: np.random.Generator, w: int, h: int, watermark: str | None):
    from PIL import Image, ImageDraw, ImageFont

    # Smooth colour field from a small random grid, upsampled: cheap and photo-like.
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1 = x0 + int(rng.integers(w // 10 + 1, w // 2 + 2))
        y1 = y0 + int(rng.integers(h // 10 + 1, h // 2 + 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(120, 255)),)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    if watermark:
        size = max(10, min(w, h) // 8)
        font = ImageFont.load_default(size=size)
        step_x, step_y = max(size * 6, 40), max(size * 3, 30)
        # Tiled semi-transparent text, the common stock-photo pattern.
        for yy in range(-step_y, h + step_y, step_y):
            for xx in range(-step_x, w + step_x, step_x):
                off = (yy // step_y) % 2 * step_x // 2
                draw.text((xx + off, yy), watermark, fill=(255, 255, 255, 150), font=font)
    return img


def build_demo(folder: Path, n: int = 600, seed: int = 0) -> Path:
    """Generate the demo into ``folder`` (idempotent); return the ground-truth path."""
    import pyarrow as pa

    folder = Path(folder)
    gt_path = folder / GROUND_TRUTH
    if gt_path.exists():
        import pyarrow.parquet as pq

        if pq.read_metadata(gt_path).num_rows == n + _n_special(n) + N_DUPLICATES + N_NEAR:
            return gt_path
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in (
        "demo_id", "path", "kind", "TEXT", "true_width", "true_height", "watermarked", "duplicate_of", "near_duplicate_of")}
    from tqdm import tqdm

    for i, (w, h) in enumerate(tqdm(_size_plan(rng, n), desc="demo images", unit="img")):
        wm = WATERMARK_TEXTS[int(rng.integers(len(WATERMARK_TEXTS)))] if i % 4 == 1 else None
        img = _draw_image(rng, w, h, wm)
        name = f"img/{i:05d}.jpg"
        with atomic_path(folder / name) as tmp:
            img.save(tmp, format="JPEG", quality=int(rng.integers(80, 96)))
        caption = _caption(rng, i)
        _add(rows, i, f"/{name}", "image", caption, w, h, wm is not None)
    _add_specials(rows, folder, n, rng)
    _add_duplicates(rows)
    _add_near_duplicates(rows, folder)
    write_parquet(gt_path, pa.table(rows))
    log.info("demo data: %d rows in %s", len(rows["demo_id"]), folder)
    return gt_path


def _caption(rng: np.random.Generator, i: int) -> str:
    if i % 25 == 7:  # a few captions too short for caption-length rules
        return ["img", "", "photo 1", "IMG_2041"][i % 4]
    subject = SUBJECTS[int(rng.integers(len(SUBJECTS)))]
    return f"{STYLES[int(rng.integers(len(STYLES)))]} of {subject}"


def _add(rows, i, path, kind, caption, w, h, watermarked, duplicate_of=None, near_duplicate_of=None):
    rows["duplicate_of"].append(duplicate_of)  # demo_id of the row this one duplicates exactly
    rows["near_duplicate_of"].append(near_duplicate_of)  # demo_id of the row this one is a near copy of
    rows["demo_id"].append(i)
    rows["path"].append(path)
    rows["kind"].append(kind)
    rows["TEXT"].append(caption)
    rows["true_width"].append(w)
    rows["true_height"].append(h)
    rows["watermarked"].append(watermarked)


def _n_special(n: int) -> int:
    return max(3, n // 60) * 3


def _add_specials(rows, folder: Path, n: int, rng: np.random.Generator) -> None:
    """Dead links, HTML served at an image URL, and truncated JPEGs."""
    k = _n_special(n) // 3
    i = n
    for j in range(k):
        _add(rows, i, f"/missing/{j}.jpg", "dead_link", "a photo that is gone", None, None, False)
        i += 1
    for j in range(k):
        _add(rows, i, f"/page/{j}.jpg", "not_image", "a web page, not an image", None, None, False)
        i += 1
    for j in range(k):
        buf = io.BytesIO()
        _draw_image(rng, 640, 480, None).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        name = f"img/truncated_{j}.jpg"
        with atomic_path(folder / name) as tmp:
            tmp.write_bytes(data[: len(data) // 3])
        _add(rows, i, f"/{name}", "truncated", "photo of a broken file", 640, 480, False)
        i += 1


# exact duplicates (select.dedup): path of the copy given the original's path
DUPLICATE_PATHS = {
    "duplicate_url": lambda p: p,  # the same URL on a second row
    "duplicate_url_fragment": lambda p: p + "#copy",  # the same URL once normalised (fragment dropped)
    "duplicate_bytes": lambda p: p.replace("/img/", "/mirror/", 1),  # the same file at another path
}
N_DUPLICATES = len(DUPLICATE_PATHS)


def _passes_demo_rules(rows, i: int) -> bool:
    w, h, cap = rows["true_width"][i], rows["true_height"][i], rows["TEXT"][i].strip()
    return min(w, h) >= 256 and max(w, h) <= 3 * min(w, h) and len(cap.split()) > 2 and len(cap) > 5


def _add_duplicates(rows) -> None:
    """One copy each of the first images the demo's rules keep, so dedup (not a rule) drops it."""
    originals = [i for i, k in enumerate(rows["kind"]) if k == "image" and _passes_demo_rules(rows, i)]
    i = len(rows["demo_id"])
    for (kind, path_of), o in zip(DUPLICATE_PATHS.items(), originals, strict=False):
        _add(rows, i, path_of(rows["path"][o]), kind, rows["TEXT"][o], rows["true_width"][o],
             rows["true_height"][o], rows["watermarked"][o], duplicate_of=rows["demo_id"][o])
        i += 1


# near duplicates (select.dedup.phash): (kind, scale, JPEG quality) of a new file made from an
# original the demo's rules keep, under a URL of its own; the pHash rule drops one of each pair
NEAR_COPIES = [("near_duplicate_requality", 1.0, 35), ("near_duplicate_resized", 0.7, 90),
               ("near_duplicate_requality", 1.0, 50), ("near_duplicate_resized", 0.6, 85)]
N_NEAR = len(NEAR_COPIES)


def _add_near_duplicates(rows, folder: Path) -> None:
    """Re-encoded and resized copies of originals the rules keep (not watermarked, so the text rule
    keeps them; not already exactly duplicated; large enough that the smaller copy passes too)."""
    from PIL import Image

    exact = set(rows["duplicate_of"])
    originals = [i for i, k in enumerate(rows["kind"]) if k == "image" and _passes_demo_rules(rows, i)
                 and not rows["watermarked"][i] and min(rows["true_width"][i], rows["true_height"][i]) >= 440
                 and rows["demo_id"][i] not in exact]
    i = len(rows["demo_id"])
    for j, ((kind, scale, quality), o) in enumerate(zip(NEAR_COPIES, originals, strict=False)):
        with Image.open(folder / rows["path"][o].lstrip("/")) as img:
            img = img.convert("RGB")
            w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
            copy = img.resize((w, h), Image.LANCZOS) if scale != 1.0 else img
        name = f"img/near_{j:03d}.jpg"
        with atomic_path(folder / name) as tmp:
            copy.save(tmp, format="JPEG", quality=quality)
        _add(rows, i, f"/{name}", kind, rows["TEXT"][o], w, h, False, near_duplicate_of=rows["demo_id"][o])
        i += 1


class _DemoHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/mirror/"):  # the same file as /img/... (exact duplicate bytes)
            self.path = "/img/" + self.path[len("/mirror/"):]
        if self.path.startswith("/missing/"):
            self.send_error(404, "gone")
            return
        if self.path.startswith("/page/"):
            body = b"<html><body><h1>Not an image</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug("demo server: " + format, *args)


# The demo's port, hence its URLs and the shards' metadata, is stable per folder so that reruns give
# identical outputs. It is drawn from 20000-31999: below the ephemeral ports the OS hands to outgoing
# connections (Linux 32768-60999, macOS and Windows 49152-65535), any of which could hold it (a client
# socket left open blocks the bind), and above Ray's default worker ports (10002-19999).
PORT_BASE, PORT_SPAN = 20000, 12000


def _preferred_port(folder: Path) -> int:
    import zlib

    crc = zlib.crc32(str(Path(folder).resolve()).encode())
    before = PORT_BASE + crc % 20000  # the range used until 2026-11: a folder whose port was fine keeps it
    return before if before < PORT_BASE + PORT_SPAN else PORT_BASE + crc % PORT_SPAN


@contextlib.contextmanager
def serve_folder(folder: Path, handler=_DemoHandler, port: int | None = None) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (``port``, else any free port); yield the base URL."""

    def make(*a, **kw):
        return handler(*a, directory=str(folder), **kw)

    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port or 0), make)
    except OSError as e:
        log.warning("port %s is taken (%s); serving on a free port, so demo URLs change this run", port, e)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def url_list(folder: Path, base_url: str) -> Path:
    """Write the LAION-style URL list for a running server; return its path."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    gt = pq.read_table(Path(folder) / GROUND_TRUTH)
    urls = pc.binary_join_element_wise(base_url, gt["path"], "")
    table = (
        gt.select(["TEXT", "demo_id"])
        .append_column("URL", urls)
        .append_column("WIDTH", gt["true_width"])
        .append_column("HEIGHT", gt["true_height"])
        .select(["URL", "TEXT", "WIDTH", "HEIGHT", "demo_id"])
    )
    out = Path(folder) / "urls.parquet"
    write_parquet(out, table)
    return out


@contextlib.contextmanager
def serve_demo(folder: Path, n: int = 600) -> Iterator[Path]:
    """Build (if needed) and serve the demo; yield a URL-list parquet for this server."""
    build_demo(folder, n)
    with serve_folder(folder, port=_preferred_port(folder)) as base:
        log.info("demo server on %s", base)
        yield url_list(folder, base)
