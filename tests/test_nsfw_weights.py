"""`curate weights` builds the LAION NSFW detector files from LAION's zips without TensorFlow
(filters/savedmodel.py): same tensors and tables as the reference conversion in ../shared/models."""

import dataclasses
import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from t2i_curate.filters.nsfw import (
    NSFW_B32,
    NSFW_B32_TABLES,
    NSFW_L14,
    NSFW_L14_TABLES,
    ZIP_B32,
    ZIP_L14,
    load_converted,
)
from t2i_curate.filters.savedmodel import (
    SavedModelError,
    read_sstable,
    write_nsfw_tables,
    write_nsfw_weights,
)
from t2i_curate.pipeline.core.config import ModelsConfig
from t2i_curate.pipeline.core.weights import (
    WeightsMismatchError,
    WeightsMissingError,
    fetch_all,
    resolve_weight,
)

CASES = [(ZIP_L14, NSFW_L14, NSFW_L14_TABLES, [180, 316, 413, 440, 644]),
         (ZIP_B32, NSFW_B32, NSFW_B32_TABLES, [92, 133, 312])]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=CASES, ids=["L14", "B32"])
def built(request, tmp_path_factory):
    from conftest import SHARED

    if not SHARED.is_dir():
        pytest.skip("../shared is absent (a user's clone has none)")
    zip_, weights, tables, columns = request.param
    out = tmp_path_factory.mktemp(zip_.name)
    write_nsfw_weights(SHARED / "models" / zip_.filename, out / weights.filename)
    write_nsfw_tables(SHARED / "models" / zip_.filename, out / tables.filename)
    return SHARED / "models", out, weights, tables, columns


def test_built_tensors_are_the_reference_conversions(built):
    ref_dir, out, weights, _, _ = built
    ref, mine = load_file(str(ref_dir / weights.filename)), load_file(str(out / weights.filename))
    assert set(mine) == {k for k in ref if not k.startswith("reference_")}  # TF's outputs need TF
    for k, v in mine.items():
        assert v.dtype == ref[k].dtype and v.shape == ref[k].shape and np.array_equal(v, ref[k]), k
    assert _sha(out / weights.filename) == weights.also_accept[0]  # pinned: the build is deterministic


def test_built_tables_are_the_reference_tables(built):
    ref_dir, out, _, tables, columns = built
    spec = json.loads((out / tables.filename).read_text())
    assert spec == json.loads((ref_dir / tables.filename).read_text()) and spec["columns"] == columns
    assert all(len(spec["tables"][str(c)]) > 700 for c in columns)
    assert _sha(out / tables.filename) == tables.sha256  # byte for byte


def test_detector_on_built_files_reproduces_the_saved_model(built):
    ref_dir, out, weights, tables, _ = built
    head = load_converted(out / weights.filename, out / tables.filename)
    ref = load_file(str(ref_dir / weights.filename))
    with torch.inference_mode():
        got = head(torch.from_numpy(ref["reference_input"]))
    assert (got - torch.from_numpy(ref["reference_output"]).double()).abs().max().item() < 1e-5


def test_curate_weights_builds_into_the_cache_from_a_local_zip(tmp_path, shared):
    cache = tmp_path / "cache"
    mcfg = ModelsConfig(preset="real", cache_dir=str(cache),
                        local_weights={ZIP_B32.name: str(shared / "models" / ZIP_B32.filename)})
    with pytest.raises(WeightsMissingError, match="`curate weights` builds it from clip_autokeras_nsfw_b32.zip"):
        resolve_weight(NSFW_B32, mcfg)  # loading never builds
    paths = fetch_all(mcfg, [], [NSFW_B32, NSFW_B32_TABLES])
    assert paths == {w.name: str(cache / w.filename) for w in (NSFW_B32, NSFW_B32_TABLES)}
    assert resolve_weight(NSFW_B32, mcfg) == cache / NSFW_B32.filename  # now it loads, sha256 checked
    mtime = (cache / NSFW_B32.filename).stat().st_mtime_ns
    fetch_all(mcfg, [], [NSFW_B32, NSFW_B32_TABLES])  # a second run keeps what is there
    assert (cache / NSFW_B32.filename).stat().st_mtime_ns == mtime
    # a build whose output is not the pinned file leaves nothing in the cache
    wrong = dataclasses.replace(NSFW_B32, filename="other.safetensors", sha256="0" * 64, also_accept=())
    with pytest.raises(WeightsMismatchError, match="pinned to 0000"):
        fetch_all(mcfg, [], [wrong])
    assert sorted(p.name for p in cache.iterdir()) == sorted([NSFW_B32.filename, NSFW_B32_TABLES.filename])


def test_a_zip_that_is_not_a_saved_model_is_refused(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("model/readme.txt", "hello")
    with pytest.raises(SavedModelError, match=r"expected one '\*variables/variables.index'.*found 0"):
        write_nsfw_weights(bad, tmp_path / "w.safetensors")
    (tmp_path / "plain.zip").write_bytes(b"not a zip")
    with pytest.raises(SavedModelError, match="not a zip file"):
        write_nsfw_tables(tmp_path / "plain.zip", tmp_path / "t.json")
    with pytest.raises(SavedModelError, match="not an SSTable"):
        read_sstable(b"\0" * 64)
