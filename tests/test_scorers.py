"""Model-backed scorers: tiny models offline, real checkpoints from ../shared when present."""

import io
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from t2i_curate.filters.aesthetic import AESTHETIC_V1_B32, AESTHETIC_V1_L14, AESTHETIC_V2, load_aesthetic_head
from t2i_curate.filters.registry import preflight
from t2i_curate.filters.watermark import watermark_model
from t2i_curate.pipeline.core.config import ModelsConfig, ScoreConfig, load_config
from t2i_curate.pipeline.core.weights import WeightsMismatchError, WeightsMissingError, resolve_weight

ALL = ["resolution", "watermark", "aesthetic", "clip_similarity"]


def _jpeg(w, h, color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(tmp_path, samples):
    """A download shard as img2dataset writes it: tar + parquet + stats."""
    import pyarrow as pa

    d = tmp_path / "run" / "download"
    d.mkdir(parents=True)
    rows = []
    with tarfile.open(d / "00000.tar", "w") as tf:
        for key, data, caption in samples:
            for ext, payload in (("jpg", data), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            rows.append({"key": key, "caption": caption, "status": "success", "error_message": None,
                         "original_width": 64, "original_height": 48})
    pq.write_table(pa.Table.from_pylist(rows), d / "00000.parquet")
    (d / "00000_stats.json").write_text("{}")
    return tmp_path / "run"


def test_tiny_scoring_pass_columns_flags_and_decode_failure(tmp_path):
    from t2i_curate.pipeline.core.scores import read_provenance
    from t2i_curate.pipeline.score.stage import score_shard

    good = _jpeg(64, 48)
    run = _shard(tmp_path, [("0000000", good, "a red square"), ("0000001", good[: len(good) // 4], "cut"),
                            ("0000002", b"<html>not an image</html>", "html"), ("0000003", _jpeg(300, 90), "wide")])
    scfg = ScoreConfig(scorers=ALL, batch_size=2, models=ModelsConfig(preset="tiny"))
    counts = score_shard(str(run), scfg.model_dump_json(), 0)
    assert counts == {"skipped": 0, "scored": 2, "failed": 2}
    t = {r["key"]: r for r in pq.read_table(run / "scores" / "00000.parquet").to_pylist()}
    assert t["0000001"]["score_status"] == "failed" and "decode" in t["0000001"]["score_error"]
    assert "UnidentifiedImageError" in t["0000002"]["score_error"]
    assert t["0000001"]["pwatermark"] is None
    for k in ("0000000", "0000003"):
        r = t[k]
        assert r["score_status"] == "ok" and 0.0 <= r["pwatermark"] <= 1.0
        assert -1.0 <= r["similarity"] <= 1.0 and np.isfinite(r["aesthetic_score"])
        assert r["similarity_model"] == "tiny:ViT-B-32/openai" and r["tiny_models"] is True
    emb = np.load(run / "scores" / "embeddings" / "00000.npy")
    assert emb.dtype == np.float16 and emb.shape == (2, 32)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=1e-2)
    assert t["0000003"]["embedding_row"] == 1 and t["0000001"]["embedding_row"] is None
    prov = read_provenance(run)
    assert prov["aesthetic"]["tiny"] == "true" and prov["watermark"]["tiny"] == "true"
    # the same shard again: skipped, unchanged
    assert score_shard(str(run), scfg.model_dump_json(), 0)["skipped"] == 1


def test_scores_do_not_depend_on_batch_size(tmp_path):
    from t2i_curate.pipeline.score.stage import score_shard

    samples = [(f"000000{i}", _jpeg(40 + 10 * i, 50, (20 * i, 100, 50)), f"caption {i}") for i in range(5)]
    outs = []
    for bs in (1, 4):
        run = _shard(tmp_path / f"b{bs}", samples)
        scfg = ScoreConfig(scorers=ALL, batch_size=bs, models=ModelsConfig(preset="tiny"))
        score_shard(str(run), scfg.model_dump_json(), 0)
        outs.append(pq.read_table(run / "scores" / "00000.parquet").to_pylist())
    for a, b in zip(*outs, strict=True):
        for c in ("pwatermark", "aesthetic_score", "similarity"):
            assert a[c] == pytest.approx(b[c], abs=1e-4)


def test_missing_real_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scfg = ScoreConfig(scorers=ALL, models=ModelsConfig(preset="real", cache_dir=str(tmp_path / "empty")))
    import open_clip  # noqa: F401  (the timer measures the lookup, not importing torch)

    t = time.perf_counter()
    with pytest.raises(WeightsMissingError) as e:
        preflight(scfg)
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    assert "ViT-L-14/openai" in msg and "make weights" in msg and "local_weights" in msg


def test_missing_weights_via_cli_exit_2(tmp_path):
    from conftest import curate

    r = curate("score", "--config", "sd-v1", "--set", f"runs_dir={tmp_path}", "--set", "score.models.preset=real",
               "--set", f"score.models.cache_dir={tmp_path / 'none'}", check=False, timeout=60)
    assert r.returncode == 2 and "make weights" in r.stderr


def test_sha256_mismatch_refused(tmp_path):
    bad = tmp_path / "fake.pth"
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, bad)
    mcfg = ModelsConfig(preset="real", local_weights={"aesthetic_v1_l14": str(bad)})
    with pytest.raises(WeightsMismatchError, match="pinned to 2cd4e60f"):
        resolve_weight(AESTHETIC_V1_L14, mcfg)


def test_recorded_sha_is_pinned(tmp_path):
    from t2i_curate.filters.watermark import WATERMARK

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / WATERMARK.filename).write_bytes(b"weights v1")
    (cache / f"{WATERMARK.filename}.sha256").write_text("0" * 64 + "  watermark_model_v1.pt\n")
    with pytest.raises(WeightsMismatchError):
        resolve_weight(WATERMARK, ModelsConfig(preset="real", cache_dir=str(cache)))


# --- the real checkpoints from ../shared ------------------------------------------------------------


def _reference_v2(state, x):
    """MODELS.md: five Linear layers, no activations (dropout is identity at eval)."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x


def test_real_aesthetic_v2_matches_reference(shared, tmp_path):
    path = shared / "models" / AESTHETIC_V2.filename
    mcfg = ModelsConfig(preset="real", local_weights={"aesthetic_v2": str(path)}, cache_dir=str(tmp_path))
    head = load_aesthetic_head("v2", 768, mcfg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 768, generator=g), dim=-1)
    with torch.no_grad():
        ours = head(x).squeeze(-1)
    ref = _reference_v2(state, x).squeeze(-1)
    assert torch.allclose(ours, ref, atol=1e-5)
    # scores of normalised embeddings land on LAION's 1-10 scale neighbourhood, not 20-30
    assert ours.abs().max() < 15


@pytest.mark.parametrize("wf,dim", [(AESTHETIC_V1_L14, 768), (AESTHETIC_V1_B32, 512)])
def test_real_aesthetic_v1_matches_reference(shared, tmp_path, wf, dim):
    path = shared / "models" / wf.filename
    mcfg = ModelsConfig(preset="real", local_weights={wf.name: str(path)}, cache_dir=str(tmp_path))
    head = load_aesthetic_head("v1", dim, mcfg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    x = torch.nn.functional.normalize(torch.randn(4, dim), dim=-1)
    with torch.no_grad():
        assert torch.allclose(head(x), x @ state["weight"].T + state["bias"], atol=1e-6)


def test_demo_preset_runs_all_three_scorers():
    cfg = load_config("demo")
    assert {"watermark", "aesthetic", "clip_similarity"} <= set(cfg.score.scorers)
    assert cfg.score.models.preset == "tiny"
    assert load_config("sd-v1").score.models.preset == "real"


@pytest.mark.slow
def test_full_size_architectures_match_real_files(shared):
    """Built without weights: keys and shapes the real checkpoints need."""
    import open_clip

    state = torch.load(shared / "models" / AESTHETIC_V2.filename, map_location="cpu", weights_only=True)
    from t2i_curate.filters.aesthetic import aesthetic_mlp

    ours = aesthetic_mlp(768).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in state.items()}
    wm = watermark_model().state_dict()
    assert wm["classifier.0.weight"].shape == (625, 1536) and wm["classifier.5.weight"].shape == (2, 256)
    assert wm["conv_stem.weight"].shape == (40, 3, 3, 3)  # EfficientNet-B3 stem
    clip = open_clip.create_model("ViT-L-14", pretrained=None)
    sd = clip.state_dict()
    assert sd["visual.proj"].shape == (1024, 768) and sd["text_projection"].shape == (768, 768)
    b32 = open_clip.create_model("ViT-B-32", pretrained=None).state_dict()
    assert b32["visual.proj"].shape == (768, 512)
