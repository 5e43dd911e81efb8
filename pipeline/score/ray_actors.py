"""Score on Ray at cluster shape: CPU decode tasks feed a pool of model actors.

``executor: ray`` with ``ray.score_actors: true`` replaces "one task per shard that decodes and scores"
by two kinds of workers (docs/cluster.md explains the design and why it is Ray core, not Ray Data):

- **decode tasks** (``num_cpus=1``, no GPU), one per shard, a Ray streaming generator: read the
  shard's download parquet and tar, decode every image once and apply the scorers' transforms with
  the same code the local path runs (:func:`score.shard_batches`), and yield the key list, then
  one ``(rows, inputs, errors)`` batch per object, in key order; an input whose transform ends in
  to-tensor then ``Normalize`` (CLIP's, the watermark model's) travels as uint8 pixels, and the
  actor applies those two steps; a transform with its own ``transport`` split (NudeNet's) ships its
  uint8 half the same way (:func:`split_for_transport`);
- **model actors** (``num_gpus=ray.gpus_per_worker``), each holding a :class:`score.ShardScorer`
  (models loaded once), scoring batches of any shard (:meth:`ShardScorer.score_batch`).

The driver routes batches to the least loaded actor and assembles each shard's results. Nothing is
written for a shard until every one of its batches is back and its keys are exactly the shard's
download successes; then :func:`score.commit_shard` writes the embeddings and the score parquet
(last, the completion marker) atomically, with the same metadata as the task path. A killed actor
is restarted and its calls re-sent (``max_restarts``/``max_task_retries``), a decode task whose
worker dies is replayed (``max_retries``); a shard that still fails is retried once, then reported.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.config import RayConfig, RunConfig, ScoreConfig
from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import file_stamp
from t2i_curate.pipeline.core.layout import RunLayout
from t2i_curate.pipeline.core.scores import commit_shard, scorer_settings, shard_is_current
from t2i_curate.pipeline.executors.shards import ShardResults
from t2i_curate.pipeline.score.shards import ShardScorer, assemble_columns, shard_batches, success_rows

log = logging.getLogger(__name__)

ACTOR_DEPTH = 2  # calls queued per actor: the next batch is already there when one finishes
ACTOR_RESTARTS = 3  # a killed actor is restarted and its queued calls re-sent, this many times
DECODE_AHEAD = 2  # decoded batches a decode task may hold unread by the driver (object store memory)
DECODE_RETRIES = 2  # a decode task whose worker dies is re-run (a streaming generator replays) this many times


_TO_TENSOR = ("ToTensor", "MaybeToTensor")  # torchvision's, and open_clip's (a no-op on a tensor)


def split_for_transport(transforms: dict[str, Callable]) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """``(decode side, actor side)`` of the scorers' transforms. A ``Compose`` that ends in to-tensor
    then ``Normalize`` (CLIP's, the watermark model's) is cut before the to-tensor: the decode task
    ships the resized uint8 pixels, 1/4 of float32's bytes through the object store, and the actor
    finishes the batch (:func:`finish_inputs`) with the same element-wise ops, so the model inputs are
    bit-identical to the local path's. A transform may say how it splits itself: a ``transport`` attribute
    ``(decode side, batch finisher)`` (NudeNet's letterbox, then its float blob). Any other transform runs
    whole in the decode task."""
    from torchvision.transforms import Compose, Normalize

    head, tail = {}, {}
    for name, t in transforms.items():
        steps = t.transforms if isinstance(t, Compose) else []
        if getattr(t, "transport", None) is not None:
            head[name], tail[name] = t.transport
        elif len(steps) >= 2 and type(steps[-2]).__name__ in _TO_TENSOR and isinstance(steps[-1], Normalize):
            head[name], tail[name] = Compose([*steps[:-2], _uint8_pixels]), steps[-1]
        else:
            head[name] = t
    return head, tail


def _uint8_pixels(img):
    """A PIL image -> its HxWxC uint8 tensor (what to-tensor reads before it scales)."""
    import numpy as np
    import torch

    a = np.array(img, copy=True)
    if a.dtype != np.uint8:
        raise ValueError(f"expected 8-bit pixels before the model's to-tensor, got mode {img.mode}")
    return torch.from_numpy(a[:, :, None] if a.ndim == 2 else a)


def finish_inputs(inputs: dict[str, Any], tail: dict[str, Callable]) -> dict[str, Any]:
    """Batches of uint8 pixels (B, H, W, C) -> the model's normalised float inputs (B, C, H, W), with the
    element-wise ops to-tensor and ``Normalize`` apply one image at a time, so bit-identical: on the
    CPU (CUDA may turn ``/ 255`` into a multiply) and in float32 (to-tensor's default dtype). One float
    buffer per input, normalised in place: this runs on the model actor before each forward pass. An input
    whose transform brought its own finisher (``transport``) is handed to it."""
    import torch
    from torchvision.transforms import Normalize
    from torchvision.transforms.functional import normalize

    out = dict(inputs)
    for name, norm in tail.items():
        if name not in inputs:
            continue
        x = inputs[name]
        if not isinstance(norm, Normalize):  # a transform's own batch finisher (its ``transport``)
            out[name] = norm(x)
            continue
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise TypeError(f"{name}: expected a (B, H, W, C) uint8 batch from the decode task, got "
                            f"{x.dtype} {tuple(x.shape)}")
        y = torch.empty((x.shape[0], x.shape[3], x.shape[1], x.shape[2]), dtype=torch.float32)
        y.copy_(x.permute(0, 3, 1, 2)).div_(255)
        out[name] = normalize(y, norm.mean, norm.std, inplace=True)
    return out


class ModelActor:
    """Holds the configured scorers (models loaded once) and scores batches of any shard."""

    def __init__(self, scfg_json: str):
        self.scorer = ShardScorer.for_config(ScoreConfig.model_validate_json(scfg_json))
        self.decode_side, self.tail = split_for_transport(self.scorer.transforms)

    def meta(self) -> dict[str, Any]:
        """What the driver and the decode tasks need: the decode side of the transforms (so decode is
        bit-identical to the local path's), the draft size, the columns and the provenance written with
        every shard."""
        s = self.scorer
        return {"transforms": self.decode_side, "draft": s.draft, "columns": s.columns, "tiny": s.tiny_flag(),
                "provenance": s.provenance(), "embedding_model": s.embedding_model()}

    def pid(self) -> int:
        return os.getpid()

    def score(self, batch) -> tuple[dict[str, dict], dict[str, Any]]:
        rows, inputs, errors = batch
        inputs = finish_inputs(inputs, self.tail)
        results: dict[str, dict] = {}
        embeddings: dict[str, Any] = {}
        self.scorer.score_batch(rows, inputs, errors, results, embeddings)
        return results, embeddings


def decode_shard(run_dir: str, scfg_json: str, shard: int, transforms: dict, draft: int | None):
    """Ray generator: yield the shard's sorted success keys, then its decoded batches in key order."""
    # one CPU per task: decode scales by running more tasks, not DataLoader processes inside one
    scfg = ScoreConfig.model_validate_json(scfg_json).model_copy(update={"decode_workers": 0})
    lay = RunLayout(run_dir)
    rows = success_rows(lay.download_parquet(shard))
    yield [r["key"] for r in rows]
    yield from shard_batches(rows, lay.download_tar(shard), transforms, scfg, draft)


def pool_size(ray_cfg: RayConfig) -> int:
    """Model actors: ``ray.actors`` when set, else one per ``gpus_per_worker`` share of the cluster's
    GPUs, else 1 (a cluster without GPUs: the actor runs the models on CPU)."""
    import ray

    if ray_cfg.actors:
        return ray_cfg.actors
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus and ray_cfg.gpus_per_worker:
        return max(1, int(gpus / ray_cfg.gpus_per_worker + 1e-9))
    return 1


def start_actors(scfg: ScoreConfig, ray_cfg: RayConfig, n: int) -> list:
    import ray

    cls = ray.remote(num_cpus=1, num_gpus=ray_cfg.gpus_per_worker, max_restarts=ACTOR_RESTARTS,
                     max_task_retries=ACTOR_RESTARTS)(ModelActor)
    return [cls.remote(scfg.model_dump_json()) for _ in range(n)]


@dataclass
class _Shard:
    shard: int
    stamp: str
    gen: Any  # the decode task's ObjectRefGenerator
    keys: list[str] | None = None
    decoded: bool = False  # the generator is exhausted
    pending: int = 0  # batches sent to actors, not back yet
    results: dict[str, dict] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class ActorScorer:
    """One pass over ``shards``: decode tasks, the actor pool and per-shard commits.

    ``on_batch(n_batches_scored, actors)`` is called on the driver after every scored batch (tests
    use it to kill an actor mid-run)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, actors: list, meta: dict,
                 on_batch: Callable[[int, list], None] | None = None, stamps: dict[int, str] | None = None):
        import ray

        self.cfg, self.lay, self.actors, self.meta = cfg, RunLayout(run_dir), actors, meta
        self.scfg_json = cfg.score.model_dump_json()
        self.settings = scorer_settings(cfg.score)
        self.transforms_ref = ray.put(meta["transforms"])
        self.decode = ray.remote(num_cpus=1, max_retries=DECODE_RETRIES,
                                 _generator_backpressure_num_objects=DECODE_AHEAD)(decode_shard)
        self.on_batch, self.n_batches = on_batch, 0
        self.stamps = stamps or {}  # shards known not current, stamped by the caller
        self.load = [0] * len(actors)
        self.queue: deque[tuple[_Shard, Any]] = deque()  # decoded batches waiting for an actor
        self.inflight: dict[Any, tuple[_Shard, int]] = {}  # actor call -> (shard, actor index)
        self.active: dict[int, _Shard] = {}

    def run(self, shards: list[int], bar) -> ShardResults:
        import ray

        out, todo = ShardResults(), deque(shards)
        while todo or self.active:
            while todo and len(self.active) < max(1, self.cfg.workers):
                self._start(todo.popleft(), out, bar)
            self._dispatch()
            queued = {id(q) for q, _ in self.queue}
            for s in [s for s in self.active.values() if s.decoded and not s.pending and id(s) not in queued]:
                self._finish(s, out, bar)
            gens = {s.gen: s for s in self.active.values() if not s.decoded}
            waitable = list(self.inflight) + (list(gens) if len(self.queue) < len(self.actors) * 2 else [])
            if waitable:  # empty only when every active shard was just finished
                ready, _ = ray.wait(waitable, num_returns=1)
                for r in ready:
                    if r in gens:
                        self._next_batch(gens[r])
                    else:
                        self._scored(r)
        return out

    def _start(self, shard: int, out: ShardResults, bar) -> None:
        lay = self.lay
        try:
            stamp = self.stamps.get(shard)
            current = False
            if stamp is None:
                stamp = file_stamp(lay.download_parquet(shard), lay.download_tar(shard))
                current = shard_is_current(lay.score_parquet(shard), stamp, self.settings)
        except Exception:  # the shard boundary, as on the task path: record it, the others go on
            out.errors[shard] = traceback.format_exc()
            bar.update(1)
            return
        if current:
            out.results[shard] = {"skipped": 1, "scored": 0, "failed": 0}
            bar.update(1)
            return
        gen = self.decode.remote(str(lay.root), self.scfg_json, shard, self.transforms_ref, self.meta["draft"])
        self.active[shard] = _Shard(shard, stamp, gen)

    def _next_batch(self, s: _Shard) -> None:
        import ray

        try:
            ref = next(s.gen)
        except StopIteration:
            s.decoded = True
            return
        if s.keys is not None:
            self.queue.append((s, ref))
            return
        try:
            s.keys = ray.get(ref)
        except ray.exceptions.RayError as e:  # the decode task failed before its first batch
            s.error, s.decoded = f"decode: {type(e).__name__}: {e}", True

    def _dispatch(self) -> None:
        while self.queue:
            i = min(range(len(self.actors)), key=self.load.__getitem__)
            if self.load[i] >= ACTOR_DEPTH:
                return
            s, ref = self.queue.popleft()
            if s.error is not None:  # the shard already failed: its other batches are not scored
                continue
            self.inflight[self.actors[i].score.remote(ref)] = (s, i)
            self.load[i] += 1
            s.pending += 1

    def _scored(self, ref) -> None:
        import ray

        s, i = self.inflight.pop(ref)
        self.load[i] -= 1
        s.pending -= 1
        try:
            results, embeddings = ray.get(ref)
        except ray.exceptions.RayError as e:  # a decode error, or an actor dead past its restarts
            s.error = s.error or f"{type(e).__name__}: {e}"
            return
        dup = s.results.keys() & results.keys()
        if dup:
            s.error = s.error or f"keys scored twice: {sorted(dup)[:5]}"
        s.results.update(results)
        s.embeddings.update(embeddings)
        self.n_batches += 1
        if self.on_batch is not None:
            self.on_batch(self.n_batches, self.actors)

    def _finish(self, s: _Shard, out: ShardResults, bar) -> None:
        """Commit a shard whose batches are all back: exactly its keys, each once, or nothing."""
        del self.active[s.shard]
        bar.update(1)
        if s.error is None and sorted(s.results) != s.keys:
            got, want = set(s.results), set(s.keys or [])
            s.error = f"scored keys differ from the shard's: missing {sorted(want - got)[:5]}, " \
                      f"extra {sorted(got - want)[:5]}"
        if s.error is not None:
            out.errors[s.shard] = s.error
            out.results.pop(s.shard, None)
            return
        m = self.meta
        columns, emb = assemble_columns(s.results, s.embeddings, m["columns"], m["tiny"])
        info = {"source_stamp": s.stamp, "settings": self.settings, "provenance": m["provenance"]}
        try:
            out.results[s.shard] = commit_shard(self.lay, s.shard, info, columns, emb, m["embedding_model"])
        except Exception:  # e.g. a full disk: this shard fails (its parquet, the marker, is not there)
            out.errors[s.shard] = traceback.format_exc()
            return
        out.errors.pop(s.shard, None)


def score_on_actors(cfg: RunConfig, run_dir: Path, shards: list[int], *, retries: int = 1,
                    on_batch: Callable[[int, list], None] | None = None,
                    stamps: dict[int, str] | None = None) -> ShardResults:
    """Score ``shards`` with CPU decode tasks feeding a pool of model actors; return per-shard counts
    (``skipped``/``scored``/``failed``) and the errors of shards that failed after ``retries``.
    ``stamps``: the source stamps of shards the caller found not current (the score stage, from one
    listing); the driver sends no request for them and does not check them again: a shard given a stamp
    is scored. Other shards are stamped and checked here."""
    import ray
    from tqdm import tqdm

    from t2i_curate.pipeline.executors.ray_tasks import ensure_ray

    if cfg.score.decode == "gpu":
        raise UserError("ray.score_actors decodes on CPU tasks, so it takes score.decode exact or fast; got "
                        "score.decode=gpu (nvJPEG on the model's GPU): set ray.score_actors=false to use it")
    ensure_ray(cfg.ray)
    n, cpus = pool_size(cfg.ray), ray.cluster_resources().get("CPU", 0.0)
    if cpus < n + 1:
        raise UserError(f"ray.score_actors needs a CPU per model actor and at least one for decode tasks: "
                        f"{n} actor(s) on a cluster with {cpus:g} CPU(s); set ray.actors lower or add CPUs")
    actors = start_actors(cfg.score, cfg.ray, n)
    log.info("score: %d model actor(s), %d decode task(s) at a time", len(actors), cfg.workers)
    try:
        meta = ray.get(actors[0].meta.remote())
        out, pending = ShardResults(), list(shards)
        for attempt in range(retries + 1):
            if not pending:
                break
            if attempt:  # a fresh pool: an actor dead past its restarts would fail the retry too
                for a in actors:
                    ray.kill(a)
                actors = start_actors(cfg.score, cfg.ray, n)
            with tqdm(total=len(pending), desc="score" if attempt == 0 else "score (retry)", unit="shard") as bar:
                res = ActorScorer(cfg, run_dir, actors, meta, on_batch, stamps).run(pending, bar)
            out.results.update(res.results)
            for k in res.results:
                out.errors.pop(k, None)
            out.errors.update(res.errors)
            for k, v in res.errors.items():
                log.warning("score: shard %s failed (attempt %d): %s", k, attempt + 1, v.strip().splitlines()[-1])
            pending = sorted(res.errors)
        return out
    finally:
        for a in actors:
            ray.kill(a)
