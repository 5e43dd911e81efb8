"""Near duplicates: the phash scorer, the near_duplicate_phash rule and SemDeDup (semantic_duplicate)."""

import io
import json

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import curate
from PIL import Image, ImageDraw
from test_dedup import _by_row

from t2i_curate.filters.dedup import phash_bands, phash_duplicates
from t2i_curate.filters.phash import gray32, hamming, phash_bits, phash_hex
from t2i_curate.filters.semdedup import Embeddings, components, semantic_duplicates
from t2i_curate.pipeline.download.demo import serve_folder


def _picture(seed: int, w: int = 480, h: int = 360) -> Image.Image:
    """A smooth colour field with a few shapes: photo-like enough for pHash."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x, y, x + int(rng.integers(40, w // 2)), y + int(rng.integers(40, h // 2))], fill=fill)
    return img


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _reencoded(img, quality=35, scale=1.0):
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    return Image.open(io.BytesIO(_jpeg(img, quality))).convert("RGB")


# ---- the hash ------------------------------------------------------------------------------------

PINNED = "e366069b8c8e9ea6"  # phash_hex(_picture(0)) by the definition in filters/phash.py


def test_phash_pinned_and_robust_to_reencoding_and_resizing():
    img = _picture(0)
    h = phash_hex(img)
    assert h == PINNED and len(h) == 16 and h == h.lower()
    for q, s in [(35, 1.0), (90, 0.5), (60, 0.7)]:
        assert hamming(h, phash_hex(_reencoded(img, q, s))) <= 4, (q, s)
    others = [hamming(h, phash_hex(_picture(seed))) for seed in range(1, 9)]
    assert min(others) > 16, others


def test_phash_is_imagehash_definition():
    """imagehash.phash: scipy.fftpack.dct on both axes of the 32x32 LANCZOS grayscale, top-left 8x8 > median."""
    fftpack = pytest.importorskip("scipy.fftpack")
    for seed in range(4):
        pixels = gray32(_picture(seed)).astype(np.float64)
        dct = fftpack.dct(fftpack.dct(pixels, axis=0), axis=1)
        low = dct[:8, :8]
        assert (phash_bits(gray32(_picture(seed))) == (low > np.median(low))).all()
    bits = np.zeros((8, 8), bool)
    bits[0, 0] = bits[7, 7] = True  # the first bit is the most significant
    from t2i_curate.filters.phash import bits_to_hex

    assert bits_to_hex(bits) == "8000000000000001"


def test_phash_on_real_photos(shared):
    photos = sorted((shared / "images").glob("i2d_*.jpg"))[:4]
    hashes = []
    for p in photos:
        img = Image.open(p).convert("RGB")
        hashes.append(phash_hex(img))
        assert hamming(hashes[-1], phash_hex(_reencoded(img, 40, 0.6))) <= 4, p.name
    assert all(hamming(a, b) > 16 for i, a in enumerate(hashes) for b in hashes[i + 1:])


# ---- grouping ------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 1, 4, 7, 16])
def test_bands_cover_64_bits(t):
    bands = phash_bands(t)
    assert len(bands) == t + 1
    assert sum(bin(m).count("1") for _, m in bands) == 64
    covered = 0
    for s, m in bands:
        assert covered & (m << s) == 0
        covered |= m << s
    assert covered == (1 << 64) - 1


def test_components_union_find():
    comp = components(7, np.array([0, 2, 5, 3]), np.array([1, 3, 6, 4]))
    assert comp.tolist() == [0, 0, 2, 2, 2, 5, 5]
    chain = components(6, np.array([5, 4, 3, 2, 1]), np.array([4, 3, 2, 1, 0]))
    assert chain.tolist() == [0] * 6


def _flip(h: int, *bits: int) -> str:
    for b in bits:
        h ^= 1 << b
    return f"{h:016x}"


def test_phash_groups_transitively_and_keep_the_lowest_rank():
    base, other = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    rows = [  # key, phash, dd_rank
        ("a", _flip(base), 3), ("b", _flip(base, 0, 17, 40), 1),  # 3 bits from a
        ("c", _flip(base, 0, 17, 40, 60, 61, 62), 5),  # 3 from b, 6 from a: joined through b
        ("d", _flip(base), 4),  # equal to a
        ("e", _flip(other), 2), ("f", _flip(other, 1, 9, 20, 33, 50), 6),  # 5 bits: apart at 4
        ("g", None, 7),
    ]
    con = duckdb.connect()
    con.execute("CREATE TABLE cand (key VARCHAR, phash VARCHAR, dd_rank BIGINT)")
    con.executemany("INSERT INTO cand VALUES (?, ?, ?)", rows)
    got = dict(zip(*phash_duplicates(con, "cand", 4).to_pydict().values(), strict=True))
    assert got == {"a": "b", "c": "b", "d": "b"}
    got5 = dict(zip(*phash_duplicates(con, "cand", 5).to_pydict().values(), strict=True))
    assert got5 == {"a": "b", "c": "b", "d": "b", "f": "e"}
    assert phash_duplicates(con, "cand", 0).to_pydict()["key"] == ["d"]  # only equal hashes


# ---- SemDeDup ------------------------------------------------------------------------------------

def _planted(tmp_path, n=300, d=32, seed=0):
    """Two float16 shards of random embeddings; 10 planted pairs across the shards and one triple."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    pairs = [(i, n // 2 + i) for i in range(0, 40, 4)]  # first half is shard 0, second half shard 1
    for a, b in pairs:
        x[b] = x[a] + 0.05 * rng.standard_normal(d)
    x[n - 1] = x[n - 2] = x[7] + 0.02 * rng.standard_normal(d)  # a triple: 7 (shard 0), n-2, n-1
    files = []
    for s, part in enumerate((x[: n // 2], x[n // 2:])):
        files.append(tmp_path / f"{s:05d}.npy")
        np.save(files[-1], part.astype(np.float16))
    src = np.repeat([0, 1], [n // 2, n - n // 2]).astype(np.int32)
    rows = np.concatenate([np.arange(n // 2), np.arange(n - n // 2)])
    return Embeddings(files, src, rows), pairs + [(7, n - 2), (7, n - 1)]


def test_semdedup_groups_planted_duplicates_across_shards(tmp_path):
    emb, planted = _planted(tmp_path)
    n = len(emb)
    rank = np.random.default_rng(1).permutation(n)  # the configured keep order
    dup_of, k = semantic_duplicates(emb, rank, threshold=0.95, clusters=8, seed=0)
    assert k == 8
    groups = {}
    for i in np.flatnonzero(dup_of >= 0):
        groups.setdefault(int(dup_of[i]), {int(dup_of[i])}).add(int(i))
    expected = [{a, b} for a, b in planted[:-2]] + [{7, n - 2, n - 1}]
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, expected))
    for kept, members in groups.items():
        assert kept == min(members, key=lambda i: rank[i])  # the best-ranked member is kept
        assert dup_of[kept] == -1


def test_semdedup_chunked_equals_whole_and_reads_are_bounded(tmp_path, monkeypatch):
    emb, _ = _planted(tmp_path, n=200)
    rank = np.arange(len(emb))
    whole, _ = semantic_duplicates(emb, rank, 0.95, clusters=5, seed=3, chunk_rows=10_000)
    reads = []
    real_read = Embeddings.read
    monkeypatch.setattr(Embeddings, "read", lambda self, idx: reads.append(len(idx)) or real_read(self, idx))
    chunked, _ = semantic_duplicates(emb, rank, 0.95, clusters=5, seed=3, chunk_rows=7)
    assert (chunked == whole).all() and (whole >= 0).sum() >= 10
    # k-means chunks hold 7 rows; the within-cluster step reads whole clusters (one at a time when > 7)
    assert len(reads) > 50 and sorted(reads)[len(reads) // 2] <= 7
    assert max(reads) < len(emb)


def test_semdedup_threshold_one_keeps_noisy_copies(tmp_path):
    emb, _ = _planted(tmp_path, n=100)
    dup_of, _ = semantic_duplicates(emb, np.arange(100), threshold=1.0, clusters=3)
    assert (dup_of >= 0).sum() == 0  # float16 copies with noise are never exactly equal


# ---- end to end ---------------------------------------------------------------------------------

# row -> (file, caption): 0 and 1 are the same picture (1 re-encoded at quality 35 and resized to
# 60%), 2 and 3 another one (3 at 70%), 4 stands alone
LIST = [("0.jpg", "a picture number zero"), ("0_small.jpg", "a picture number zero, smaller and much longer"),
        ("1.jpg", "a picture number one"), ("1_small.jpg", "a picture number one, smaller"),
        ("2.jpg", "a picture number two")]


@pytest.fixture(scope="module")
def near_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("near")
    site = tmp / "site"
    site.mkdir()
    for i in range(3):
        img = _picture(10 + i)
        (site / f"{i}.jpg").write_bytes(_jpeg(img, 92))
        if i < 2:
            small = img.resize((round(img.width * (0.6 if i == 0 else 0.7)), round(img.height * 0.6)), Image.LANCZOS)
            (site / f"{i}_small.jpg").write_bytes(_jpeg(small, 35))
    with serve_folder(site) as base:
        rows = [{"URL": f"{base}/{f}", "TEXT": t} for f, t in LIST]
        (tmp / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = ["--urls", tmp / "urls.jsonl", "--set", f"runs_dir={tmp / 'runs'}", "--set", "name=n",
                "--set", "download.processes=1", "--set", "workers=1", "--set", "select.rules=[]",
                "--set", "score.scorers=[resolution, phash]", "--set", "download.allow_private_addresses=true"]
        curate("run", *args)
        yield tmp / "runs" / "n", args


def test_reencoded_and_resized_copies_end_in_one_written_sample(near_run):
    run, args = near_run
    got = _by_row(run)
    assert got[0] == ("selected", None, None) and got[2] == ("selected", None, None)  # lowest key kept
    assert got[1] == ("dropped", "near_duplicate_phash", 0)
    assert got[3] == ("dropped", "near_duplicate_phash", 2)
    assert got[4] == ("selected", None, None)
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert (f["input"], f["written"], f["dropped_by_rule"]) == (5, 3, {"near_duplicate_phash": 2})
    assert "| dropped | rule `near_duplicate_phash` | 2 |" in (run / "report" / "funnel.md").read_text()
    meta = json.loads(pq.read_schema(run / "selected" / "decisions.parquet").metadata[b"t2i_curate"])
    assert meta["near_dedup"]["near_duplicate_phash"]["max_distance"] == 4
    curate("verify", run)
    hashes = duckdb.connect().execute(f"SELECT phash FROM read_parquet('{run}/scores/0*.parquet')").fetchall()
    assert all(len(h) == 16 and int(h, 16) >= 0 for (h,) in hashes)


def test_keep_order_chooses_the_near_copy_and_off_writes_both(near_run):
    run, args = near_run
    curate("run", *args, "--set", "select.dedup.keep_order='length(caption) DESC'")
    got = _by_row(run)
    assert got[1] == ("selected", None, None) and got[0] == ("dropped", "near_duplicate_phash", 1)
    p = curate("run", *args, "--set", "select.dedup.phash.enabled=false")
    assert "finished already" in p.stderr  # a selection setting: nothing is downloaded or scored again
    assert all(s == ("selected", None, None) for s in _by_row(run).values())
    curate("verify", run)


def test_phash_rule_without_the_scorer_is_refused(near_run):
    run, args = near_run
    p = curate("run", *args, "--set", "score.scorers=[resolution]", "--set", "select.dedup.phash.enabled=true",
               check=False)
    assert p.returncode == 2 and "phash" in p.stderr and "score.scorers" in p.stderr


@pytest.mark.slow  # re-scores with a tiny CLIP (~20 s)
def test_semantic_refuses_without_embeddings_and_says_tiny(near_run):
    run, args = near_run
    p = curate("run", *args, "--set", "select.dedup.semantic.enabled=true", check=False)
    assert p.returncode == 2 and "embeddings" in p.stderr
    tiny = [*args, "--set", "score.scorers=[resolution, phash, clip_similarity]", "--set", "score.models.preset=tiny"]
    curate("run", *tiny)  # auto: tiny embeddings, no semantic pass
    meta = json.loads(pq.read_schema(run / "selected" / "decisions.parquet").metadata[b"t2i_curate"])
    assert "semantic_duplicate" not in meta["near_dedup"]
    p = curate("run", *tiny, "--set", "select.dedup.semantic.enabled=true")
    assert "TINY" in p.stderr
    meta = json.loads(pq.read_schema(run / "selected" / "decisions.parquet").metadata[b"t2i_curate"])
    sem = meta["near_dedup"]["semantic_duplicate"]
    assert sem["tiny"] is True and sem["embeddings"].startswith("tiny") and sem["candidates"] == 3
    curate("verify", run)


def test_earlier_duplicates_follow_their_kept_sample_when_a_later_pass_drops_it():
    import pyarrow as pa

    from t2i_curate.filters.dedup import apply_duplicates

    dec = pa.table({"key": ["a", "b", "c", "d"], "state": ["selected", "dropped", "selected", "dropped"],
                    "rule": [None, "duplicate", None, "min_size"], "error": [None] * 4,
                    "failed_stage": [None] * 4, "duplicate_of": [None, "a", None, None]})
    dups = pa.table({"key": ["a"], "duplicate_of": ["c"]})  # the pHash pass keeps c over a
    got = apply_duplicates(duckdb.connect(), dec, dups, "near_duplicate_phash").to_pylist()
    assert [(r["key"], r["state"], r["rule"], r["duplicate_of"]) for r in got] == [
        ("a", "dropped", "near_duplicate_phash", "c"), ("b", "dropped", "duplicate", "c"),
        ("c", "selected", None, None), ("d", "dropped", "min_size", None)]
    assert got[0].keys() == {"key", "state", "rule", "error", "failed_stage", "duplicate_of"}
