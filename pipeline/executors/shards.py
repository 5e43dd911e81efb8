"""Executors map a per-shard function over shards; they decide nothing else.

``map_shards(fn, items, ...)`` runs ``fn(item)`` for every item, in a process
pool (``local``) or as Ray tasks (``ray``), with a progress bar. Exceptions are
caught at the shard boundary only: a failed shard is retried once, then
reported; the other shards still finish and their work is kept.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from t2i_curate.pipeline.core.errors import StageIncomplete

log = logging.getLogger(__name__)


@dataclass
class ShardResults:
    results: dict[Any, Any] = field(default_factory=dict)
    errors: dict[Any, str] = field(default_factory=dict)

    def raise_if_failed(self, stage: str) -> None:
        if self.errors:
            lines = "\n".join(f"  shard {k}: {v.strip().splitlines()[-1]}" for k, v in self.errors.items())
            raise ShardFailure(
                f"{stage}: {len(self.errors)} shard(s) failed after a retry; finished shards are "
                f"kept, rerun the same command to retry:\n{lines}"
            )


class ShardFailure(StageIncomplete):  # noqa: N818 (reads better at the call site)
    pass


def _call(fn: Callable, item: Any) -> tuple[bool, Any]:
    try:
        return True, fn(item)
    except Exception:  # the shard boundary: record it, the caller retries / reports
        return False, traceback.format_exc()


def map_shards(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    workers: int = 1,
    executor: str = "local",
    desc: str = "shards",
    retries: int = 1,
    initializer: Callable | None = None,
    initargs: tuple = (),
    ray_cfg=None,
    gpus: float = 0.0,
    threads: bool = False,
) -> ShardResults:
    from tqdm import tqdm

    pending = list(items)
    out = ShardResults()
    for attempt in range(retries + 1):
        if not pending:
            break
        failed = []
        with tqdm(total=len(pending), desc=desc if attempt == 0 else f"{desc} (retry)", unit="shard") as bar:
            for item, ok, value in _run(fn, pending, workers, executor, initializer, initargs, ray_cfg, gpus, threads):
                if ok:
                    out.results[item] = value
                    out.errors.pop(item, None)
                else:
                    log.warning("%s: shard %s failed (attempt %d): %s", desc, item, attempt + 1,
                                value.strip().splitlines()[-1])
                    out.errors[item] = value
                    failed.append(item)
                bar.update(1)
        pending = failed
    return out


def _run(fn, items, workers, executor, initializer, initargs, ray_cfg=None, gpus=0.0, threads=False):
    if executor == "ray":
        from t2i_curate.pipeline.executors.ray_tasks import run_ray

        yield from run_ray(_call, fn, items, workers, initializer, initargs, ray_cfg, gpus)
        return
    if workers <= 1 or len(items) == 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            ok, value = _call(fn, item)
            yield item, ok, value
        return
    if threads:  # I/O-bound stages: no process start-up, the GIL is released on file and DuckDB work
        if initializer is not None:
            initializer(*initargs)
        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(_call, fn, item): item for item in items}
            for fut in as_completed(futures):
                ok, value = fut.result()
                yield futures[fut], ok, value
        return
    import multiprocessing as mp

    # spawn: torch and HTTP threads in the parent must not leak into forked children
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        futures = {pool.submit(_call, fn, item): item for item in items}
        for fut in as_completed(futures):
            ok, value = fut.result()
            yield futures[fut], ok, value
