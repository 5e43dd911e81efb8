import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture
def shared():
    """../shared (real checkpoints, images, prompts); tests skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (a user's clone has none)")
    return SHARED


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs) for one test module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}})
    yield
    ray.shutdown()


def curate(*args, check=True, **kw):
    """Run the CLI in a subprocess, as a user would; return the CompletedProcess. Commands that take a
    config get ``download.allow_private_addresses=true`` first (tests serve their URL lists on 127.0.0.1;
    the setting is part of the run folder's fingerprint; a test's own ``--set`` after it wins)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "COLUMNS": "200",
           **kw.pop("env", {})}
    if args and args[0] not in ("compare",):
        args = (args[0], "--set", "download.allow_private_addresses=true", *args[1:])
    p = subprocess.run([sys.executable, "-m", "t2i_curate.pipeline.cli", *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=kw.pop("cwd", ROOT), **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def small_demo_args(runs_dir, name="demo", n=60, extra=()):
    return ["--set", f"runs_dir={runs_dir}", "--set", f"name={name}", "--set", f"input.demo_size={n}",
            "--set", "download.samples_per_shard=20", "--set", "write.samples_per_shard=15",
            "--set", "download.processes=1", "--set", "download.threads=8", "--set", "workers=1", *extra]


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 for one test module, with the usual
    AWS environment variables pointing at it (subprocesses inherit them); yields a fresh bucket's URL.
    ``XDG_CACHE_HOME`` points at a temporary folder: what a store-backed run keeps on the machine (demo
    images, thumbnails, eval's working folder) stays out of the user's cache."""
    s3fs = pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import logging
    import uuid

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    s3fs.S3FileSystem.clear_instance_cache()  # filesystems made before the endpoint was set must not be reused
    bucket = f"t2i-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
