"""Ray executor: the same per-shard functions as Ray tasks on an existing or local cluster.

Each shard is one task (``num_cpus=1``, ``num_gpus=ray.gpus_per_worker`` for
model stages). Ray reuses worker processes, and the per-process caches
(``ShardScorer``, the sampling pipeline) keep models loaded once per worker.
A worker that dies mid-shard is retried by Ray (``max_retries``), and the
stage's own retry covers exceptions; outputs are written atomically, so a
retried shard never duplicates a sample.

With ``ray.score_actors`` the score stage does not come here: CPU decode tasks feed a pool of
model actors instead (:mod:`t2i_curate.pipeline.score.ray_actors`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)
_INITIALISED: set[str] = set()  # per worker process: initializers already run


def ensure_ray(ray_cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    # where an object-store run folder lives (endpoint, region, profile) travels with the job; secret keys never
    # do (runtime_env is visible in Ray's job metadata): nodes take credentials from their role or environment
    env = {k: v for k, v in os.environ.items() if k in ("HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE",
                                                         "CURATE_WEIGHTS", "HF_HOME",
                                                         "OPENCV_IO_MAX_IMAGE_PIXELS", "AWS_ENDPOINT_URL",
                                                         "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                                                         "AWS_DEFAULT_REGION", "AWS_PROFILE")}
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True,
                              "runtime_env": {"env_vars": env}}
    if ray_cfg is not None and ray_cfg.address:
        kwargs["address"] = ray_cfg.address
    elif ray_cfg is not None and ray_cfg.num_cpus:
        kwargs["num_cpus"] = ray_cfg.num_cpus
    ray.init(**kwargs)
    log.info("ray: %s", ray.cluster_resources())


def _task(call: Callable, fn: Callable, item: Any, initializer: Callable | None, initargs: tuple):
    if initializer is not None:
        key = repr((initializer, initargs))
        if key not in _INITIALISED:
            initializer(*initargs)
            _INITIALISED.add(key)
    return call(fn, item)


def run_ray(call, fn, items, workers: int, initializer, initargs, ray_cfg, gpus: float = 0.0) -> Iterator:
    """Yield ``(item, ok, value)``; at most ``workers`` shards in flight. ``call(fn, item)`` runs one
    shard inside the worker and returns ``(ok, result or traceback)`` (the executor's shard boundary)."""
    import ray

    ensure_ray(ray_cfg)
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(_task)
    todo = list(items)
    inflight: dict[Any, Any] = {}
    while todo or inflight:
        while todo and len(inflight) < max(1, workers):
            item = todo.pop(0)
            inflight[remote.remote(call, fn, item, initializer, initargs)] = item
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            item = inflight.pop(ref)
            try:
                ok, value = ray.get(ref)
            except ray.exceptions.RayError as e:  # the worker died past Ray's retries
                ok, value = False, f"{type(e).__name__}: {e}"
            yield item, ok, value
