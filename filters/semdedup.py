"""SemDeDup (Abbas et al. 2023, arXiv 2303.09540) over the CLIP image embeddings a run saved.

Rule ``semantic_duplicate``: the candidates (samples still selected after the rules, exact
and pHash dedup) are clustered by spherical k-means on their L2-normalised embeddings; within
each cluster, pairs with cosine similarity >= ``threshold`` (the paper's ``1 - eps``) are
joined, the connected components are the groups, and each group keeps its first member in
``keep_order`` (the member with the lowest rank); the others point at it.

The paper instead walks each cluster in a fixed order and drops a point similar to any earlier
one; connected components give the same groups when similarity is transitive, and a kept
member that is written, which ``duplicate_of`` needs.

Memory is bounded by ``chunk_rows``: the embeddings stay in their float16 ``.npy`` shards
(memory-mapped) and are read ``chunk_rows`` at a time for every k-means pass (Lloyd's
algorithm with the sums accumulated over chunks, so a pass over 2 chunks equals one pass over
everything); the within-cluster step reads groups of whole clusters of about ``chunk_rows``
rows. Resident: about 32 bytes per candidate (shard, row, rank, cluster, duplicate-of), ``k x d`` centroids, one
chunk, and the largest cluster (a cluster bigger than ``chunk_rows`` is read whole).

Cost: a k-means pass is ``n * k * d`` multiply-adds, the within-cluster step about
``n * (n / k) * d``; ``k = ceil(sqrt(n))`` (the default) balances the two.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SEMANTIC_RULE = "semantic_duplicate"
_SIM_BLOCK = 1 << 22  # floats in one similarity block (16 MB)


def _open_npy(path) -> np.ndarray:
    """A memory map of a local ``.npy``; a remote one (object store) is read whole, one shard's worth, and
    the last few are kept (k-means reads every file on each pass)."""
    from t2i_curate.pipeline.core.io import is_remote

    return _remote_npy(str(path)) if is_remote(path) else np.load(path, mmap_mode="r")


@functools.lru_cache(maxsize=16)
def _remote_npy(url: str) -> np.ndarray:
    from t2i_curate.pipeline.core.io import load_npy

    return load_npy(url)


@dataclass
class Embeddings:
    """The candidates' embeddings, left on disk: candidate ``i`` is row ``rows[i]`` of
    ``files[src[i]]`` (float16 or float32 ``.npy``, one row per embedding)."""

    files: list[Path]
    src: np.ndarray  # int32, candidate -> file
    rows: np.ndarray  # int64, candidate -> row in its file

    def __len__(self) -> int:
        return len(self.src)

    @property
    def dim(self) -> int:
        return int(_open_npy(self.files[0]).shape[1]) if self.files else 0

    def read(self, idx: np.ndarray) -> np.ndarray:
        """float32, L2-normalised embeddings of candidates ``idx`` (in that order).

        Each file is memory-mapped for this read only (unmapped after it), so resident memory
        is what was read, never the files."""
        out = np.empty((len(idx), self.dim), np.float32)
        src = self.src[idx]
        for f in np.unique(src):
            at = np.flatnonzero(src == f)
            rows = self.rows[idx[at]]
            mm = _open_npy(self.files[int(f)])
            if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
                out[at] = mm[rows[0]:rows[-1] + 1]  # a contiguous span: one sequential read
            else:
                order = np.argsort(rows, kind="stable")  # ascending reads of the memory map
                out[at[order]] = mm[rows[order]]
            del mm
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, 1e-12)
        return out

    def chunks(self, chunk_rows: int):
        """``(idx, embeddings)`` for consecutive candidates, ``chunk_rows`` at a time."""
        for start in range(0, len(self), chunk_rows):
            idx = np.arange(start, min(start + chunk_rows, len(self)))
            yield idx, self.read(idx)


def default_clusters(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


def _assign(x, centroids):
    """Nearest centroid by cosine, computed in blocks of at most _SIM_BLOCK similarities."""
    import torch

    k = centroids.shape[0]
    step = max(1, _SIM_BLOCK // k)
    return torch.cat([(x[i:i + step] @ centroids.T).argmax(dim=1) for i in range(0, x.shape[0], step)])


def kmeans(emb: Embeddings, k: int, iterations: int, seed: int, chunk_rows: int):
    """Spherical k-means (seeded, streaming Lloyd passes); return (centroids, labels int32).

    ``labels`` are the clusters of the last pass. Stops early when under 0.1% of labels move.
    """
    import torch

    n = len(emb)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    init = np.sort(rng.choice(n, size=k, replace=False))
    centroids = torch.from_numpy(emb.read(init))
    labels = np.full(n, -1, np.int32)
    for it in range(iterations):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(k, dtype=torch.float64)
        moved = 0
        for idx, x in emb.chunks(chunk_rows):
            xt = torch.from_numpy(x)
            a = _assign(xt, centroids)
            sums.index_add_(0, a, xt)
            counts += torch.bincount(a, minlength=k).double()
            a_np = a.numpy().astype(np.int32)
            moved += int((labels[idx] != a_np).sum())
            labels[idx] = a_np
        nonempty = counts > 0
        new = sums[nonempty]
        centroids[nonempty] = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
        log.info("semdedup k-means pass %d: %d of %d labels moved", it + 1, moved, n)
        if moved <= n // 1000:
            break
    return centroids, labels


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes and edges ``a[i]-b[i]``: each node's smallest member."""
    label = np.arange(n)
    if len(a) == 0:
        return label
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]  # pointer jumping
        while not np.array_equal(new, new[new]):
            new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


def _cluster_edges(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``i < j`` of rows of ``x`` (normalised) with cosine >= threshold, in row blocks."""
    import torch

    xt = torch.from_numpy(x)
    s = x.shape[0]
    step = max(1, _SIM_BLOCK // max(s, 1))
    ai, bi = [], []
    for i in range(0, s, step):
        sim = xt[i:i + step] @ xt.T
        r, c = torch.nonzero(sim >= threshold, as_tuple=True)
        keep = c > r + i
        ai.append((r[keep] + i).numpy())
        bi.append(c[keep].numpy())
    return np.concatenate(ai), np.concatenate(bi)


def _cluster_groups(order: np.ndarray, bounds: np.ndarray, chunk_rows: int):
    """Groups of whole clusters of about ``chunk_rows`` candidates: (candidate idx, cluster starts)."""
    c, n_clusters = 0, len(bounds) - 1
    while c < n_clusters:
        end = c + 1
        while end < n_clusters and bounds[end + 1] - bounds[c] <= chunk_rows:
            end += 1
        yield order[bounds[c]:bounds[end]], bounds[c:end + 1] - bounds[c]
        c = end


def duplicates_within_clusters(emb: Embeddings, labels: np.ndarray, rank: np.ndarray, threshold: float,
                               chunk_rows: int) -> np.ndarray:
    """``dup_of[i]``: the candidate that ``i`` duplicates (its group's lowest rank), or -1."""
    n = len(emb)
    dup_of = np.full(n, -1, np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2 if n else 1))
    for idx, starts in _cluster_groups(order, bounds, chunk_rows):
        x = emb.read(idx)
        for s0, s1 in zip(starts[:-1], starts[1:], strict=True):
            if s1 - s0 < 2:
                continue
            a, b = _cluster_edges(x[s0:s1], threshold)
            if len(a) == 0:
                continue
            members = idx[s0:s1]
            comp = components(s1 - s0, a, b)
            best: dict[int, int] = {}
            for j in np.argsort(rank[members], kind="stable"):  # lowest rank first
                best.setdefault(int(comp[j]), int(members[j]))
            kept = np.array([best[int(c)] for c in comp])
            dup_of[members] = np.where(kept != members, kept, -1)
    return dup_of


def semantic_duplicates(emb: Embeddings, rank: np.ndarray, threshold: float, clusters: int | None = None,
                        iterations: int = 10, seed: int = 0, chunk_rows: int = 16384) -> tuple[np.ndarray, int]:
    """SemDeDup over ``emb``; ``rank[i]``: candidate ``i``'s place in keep order (lowest kept).
    Return (``dup_of`` as :func:`duplicates_within_clusters`, the number of clusters used)."""
    n = len(emb)
    if n < 2:
        return np.full(n, -1, np.int64), n
    k = min(n, clusters or default_clusters(n))
    _, labels = kmeans(emb, k, iterations, seed, chunk_rows)
    return duplicates_within_clusters(emb, labels, rank, threshold, chunk_rows), k


# ---- a run's saved embeddings ----------------------------------------------------------------


def _embedding_meta(score_parquet: Path) -> dict | None:
    import json

    from t2i_curate.pipeline.core.io import read_schema
    from t2i_curate.pipeline.core.scores import META_KEY

    meta = read_schema(score_parquet).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}")).get("embeddings")


def saved_embeddings(run_dir: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Score shards that saved embeddings: (score parquets, their ``.npy`` files, the models recorded)."""
    from t2i_curate.pipeline.core.io import shard_ids
    from t2i_curate.pipeline.core.layout import RunLayout

    lay = RunLayout(run_dir)
    parquets, files, models = [], [], []
    for s in shard_ids(lay.scores, ".parquet"):
        meta = _embedding_meta(lay.score_parquet(s))
        if meta:
            parquets.append(lay.score_parquet(s))
            files.append(lay.scores / meta["file"])
            models.append(meta.get("model") or "unknown")
    return parquets, files, sorted(set(models))


def _quote(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def run_embeddings(con, cand: str, parquets: list[Path], files: list[Path]) -> tuple[Embeddings, np.ndarray]:
    """The saved embeddings (:func:`saved_embeddings`) of the candidates in relation ``cand`` (key,
    dd_rank), across every score shard: (Embeddings, dd_rank per candidate). Candidates without an
    embedding take no part."""
    con.execute("CREATE OR REPLACE TEMP TABLE sd_files AS SELECT * FROM (VALUES "
                + ", ".join(f"({i}, {_quote(p)})" for i, p in enumerate(parquets)) + ") t(src, filename)")
    got = con.execute(f"""
SELECT c.dd_rank, f.src, e.embedding_row FROM {cand} c
JOIN read_parquet([{", ".join(map(_quote, parquets))}], filename = true, union_by_name = true) e USING (key)
JOIN sd_files f ON f.filename = e.filename
WHERE e.embedding_row IS NOT NULL ORDER BY c.dd_rank""").fetchnumpy()
    emb = Embeddings(files, np.asarray(got["src"], np.int32), np.asarray(got["embedding_row"], np.int64))
    return emb, np.asarray(got["dd_rank"], np.int64)
