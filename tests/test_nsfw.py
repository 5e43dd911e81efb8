"""LAION's CLIP-based NSFW detector (``punsafe``): the real conversions against the SavedModel's
reference outputs, the categorical-lookup quirk, the tiny scorer end to end, rules and weights."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from test_scorers import _jpeg, _shard

from t2i_curate.filters.nsfw import NSFW_B32, NSFW_B32_TABLES, NSFW_L14, NSFW_L14_TABLES, load_nsfw_head
from t2i_curate.filters.registry import all_weights, column_providers, needed_weights
from t2i_curate.pipeline.core.config import ModelsConfig, ScoreConfig, load_config
from t2i_curate.pipeline.core.weights import WeightsMismatchError, WeightsMissingError, resolve_weight

REAL = [("ViT-L-14/openai", 768, NSFW_L14, NSFW_L14_TABLES), ("ViT-B-32/openai", 512, NSFW_B32, NSFW_B32_TABLES)]


def _real_head(shared, clip, dim, wf, tables):
    models = shared / "models"
    mcfg = ModelsConfig(preset="real", nsfw_clip=clip, local_weights={wf.name: str(models / wf.filename),
                                                                      tables.name: str(models / tables.filename)})
    return load_nsfw_head(dim, mcfg)


def _reference(shared, wf):
    from safetensors.torch import load_file

    state = load_file(str(shared / "models" / wf.filename))
    return state["reference_input"], state["reference_output"].double()


@pytest.mark.parametrize("clip,dim,wf,tables", REAL, ids=["L14", "B32"])
def test_real_detector_reproduces_the_saved_model(shared, clip, dim, wf, tables):
    head = _real_head(shared, clip, dim, wf, tables)
    x, ref = _reference(shared, wf)
    assert x.shape == (64, dim)
    with torch.inference_mode():
        out = head(x)
        plain = head(x, categorical=False)  # a plain MLP port: no lookup
    err = (out - ref).abs().max().item()
    assert err < 1e-5, err
    # the quirk matters: skipping the lookup moves some outputs by far more than the tolerance
    assert (plain - ref).abs().max().item() > 1e-3
    # and float32 embeddings (what CLIP gives) hit the same table entries as the float64 reference rows
    assert (head(x.float()) - ref).abs().max().item() < 1e-5


def test_declared_weights_follow_the_clip():
    assert needed_weights(ScoreConfig(scorers=["nsfw"]))[1] == [NSFW_L14, NSFW_L14_TABLES]
    scfg = ScoreConfig(scorers=["nsfw"], models=ModelsConfig(nsfw_clip="ViT-B-32/openai"))
    assert needed_weights(scfg) == (["ViT-B-32/openai"], [NSFW_B32, NSFW_B32_TABLES])
    assert {NSFW_L14, NSFW_L14_TABLES, NSFW_B32, NSFW_B32_TABLES} <= set(all_weights(ScoreConfig())[1])


def test_tiny_scorer_end_to_end(tmp_path):
    from t2i_curate.pipeline.core.scores import read_provenance
    from t2i_curate.pipeline.score.stage import score_shard

    samples = [(f"000000{i}", _jpeg(40 + 20 * i, 50, (40 * i, 90, 200 - 30 * i)), f"c{i}") for i in range(5)]
    run = _shard(tmp_path, samples)
    scfg = ScoreConfig(scorers=["nsfw"], batch_size=2, models=ModelsConfig(preset="tiny"))
    assert score_shard(str(run), scfg.model_dump_json(), 0) == {"skipped": 0, "scored": 5, "failed": 0}
    rows = pq.read_table(run / "scores" / "00000.parquet").to_pylist()
    assert len(rows) == 5 and all(r["tiny_models"] is True for r in rows)
    assert all(0.0 <= r["punsafe"] <= 1.0 for r in rows)
    prov = read_provenance(run)["nsfw"]
    assert prov["tiny"] == "true" and prov["clip"] == "tiny:ViT-L-14/openai"


def test_punsafe_rule_is_accepted(tmp_path):
    import duckdb

    from t2i_curate.filters.expressions import RuleError
    from t2i_curate.pipeline.select.stage import check_rules

    assert column_providers()["punsafe"] == "nsfw"
    c = tmp_path / "c.yaml"
    c.write_text(json.dumps({"base": "demo", "select": {"rules": [{"name": "punsafe_0.5", "keep": "punsafe < 0.5"}]}}))
    rules = [r for r in load_config(str(c)).select.rules if r.name == "punsafe_0.5"]
    assert len(rules) == 1
    con = duckdb.connect()
    con.execute("CREATE VIEW samples AS SELECT 0.2::DOUBLE AS punsafe")
    check_rules(con, rules)
    con.execute("CREATE OR REPLACE VIEW samples AS SELECT 1 AS original_width")
    with pytest.raises(RuleError, match="needs the nsfw scorer"):
        check_rules(con, rules)
    cfg = load_config("laion-aesthetics-v1")
    assert "nsfw" in cfg.score.scorers and any("punsafe" in r.keep for r in cfg.select.rules)


def test_weights_are_pinned_and_not_downloadable(tmp_path):
    fake = tmp_path / NSFW_L14.filename
    fake.write_bytes(b"not the conversion")
    mcfg = ModelsConfig(preset="real", local_weights={NSFW_L14.name: str(fake)})
    with pytest.raises(WeightsMismatchError, match="pinned to 009e790d"):
        resolve_weight(NSFW_L14, mcfg)
    empty = ModelsConfig(preset="real", cache_dir=str(tmp_path / "cache"))
    for allow_download in (False, True):  # no URL: `curate weights` cannot fetch it, say how to provide it
        with pytest.raises(WeightsMissingError, match="clip_autokeras_binary_nsfw.zip .*local_weights"):
            resolve_weight(NSFW_L14, empty, allow_download=allow_download)
