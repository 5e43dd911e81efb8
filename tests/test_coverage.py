"""Concept coverage (pipeline/coverage.py): numbers against direct DuckDB / numpy, per-rule sums, tiny labels,
bounded-memory chunks, and the eval report's coverage-vs-failure section."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t2i_curate.pipeline.core.catalog import open_run
from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.report import coverage as cv

# words that occur in the demo's synthetic captions (pipeline/demo.py: STYLES x SUBJECTS), and one that never does
CONCEPTS = [
    {"concept": "photo", "terms": "photo|photos"},
    {"concept": "pets", "terms": "dog|cat"},
    {"concept": "close_up", "terms": "close-up"},
    {"concept": "latte", "terms": "latte art"},
    {"concept": "horse", "terms": "horse|horses"},
    {"concept": "zebra", "terms": "zebra"},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import curate, small_demo_args

    runs = tmp_path_factory.mktemp("cov") / "runs"
    curate("run", *small_demo_args(runs, n=40))
    return runs / "demo"


@pytest.fixture
def concepts_file(tmp_path):
    p = tmp_path / "concepts.jsonl"
    p.write_text("".join(json.dumps(c) + "\n" for c in CONCEPTS))
    return p


def _direct(con, terms: str, selected: bool) -> int:
    """The count the brief names: a word-boundary regex over captions, straight over the catalog views."""
    pattern = r"\b(" + terms + r")\b"
    return con.execute(
        "SELECT count(*) FROM samples s JOIN decisions d USING (key) WHERE s.status = 'success' "
        "AND coalesce(s.caption, '') <> '' AND regexp_matches(lower(s.caption), ?)"
        + (" AND d.state = 'selected'" if selected else ""), [pattern]).fetchall()[0][0]


def test_caption_coverage_equals_direct_duckdb_query(run, concepts_file):
    import duckdb
    from conftest import curate

    p = curate("coverage", run, "--concepts", concepts_file)
    assert "concept coverage" in p.stderr and "photo" in p.stderr
    cov = [r for r in pq.read_table(run / "report" / "coverage.parquet").to_pylist() if r["measure"] == "caption"]
    assert [r["concept"] for r in cov] == [c["concept"] for c in CONCEPTS]
    con = open_run(run)
    pop = con.execute("SELECT count(*) FROM samples WHERE status = 'success' AND coalesce(caption, '') <> ''"
                      ).fetchall()[0][0]
    pop_after = con.execute("SELECT count(*) FROM samples s JOIN decisions d USING (key) WHERE s.status = 'success' "
                            "AND coalesce(s.caption, '') <> '' AND d.state = 'selected'").fetchall()[0][0]
    for r, c in zip(cov, CONCEPTS, strict=True):
        before, after = _direct(con, c["terms"], False), _direct(con, c["terms"], True)
        assert (r["n_before"], r["n_after"]) == (before, after), c
        assert r["population_before"] == pop and r["population_after"] == pop_after
        assert r["share_before"] == pytest.approx(before / pop) and r["share_after"] == pytest.approx(after / pop_after)
        assert r["dropped_share_overall"] == pytest.approx(1 - pop_after / pop)
        assert r["dropped_share"] == (pytest.approx(1 - after / before) if before else None)
    by = {r["concept"]: r for r in cov}
    assert by["photo"]["n_before"] > by["close_up"]["n_before"] > 0 and by["zebra"]["n_before"] == 0
    assert by["latte"]["n_before"] > 0 and by["pets"]["n_before"] > 0
    assert any(r["n_after"] < r["n_before"] for r in cov)  # selection removed some matches
    # the catalog file registers both tables
    cat = duckdb.connect(str(run / "catalog.duckdb"), read_only=True)
    assert cat.execute("SELECT n_before FROM coverage WHERE concept = 'photo' AND measure = 'caption'").fetchall() \
        == [(by["photo"]["n_before"],)]
    assert cat.execute("SELECT count(*) FROM coverage_rules").fetchall()[0][0] > 0


def test_per_rule_breakdown_sums_and_matches_decisions(run, concepts_file):
    cov, rules = (t.to_pylist() for t in cv.write_coverage(run, concepts_file))
    con = open_run(run)
    for r in cov:
        mine = [x for x in rules if x["concept"] == r["concept"] and x["measure"] == r["measure"]]
        assert sum(x["n_concept_dropped"] for x in mine) == r["n_before"] - r["n_after"]
        assert sum(x["n_all_dropped"] for x in mine) == r["population_before"] - r["population_after"]
        for x in mine:
            assert x["n_concept"] == r["n_before"] and x["n_all"] == r["population_before"]
            if x["n_concept"]:
                assert x["concept_dropped_share"] == pytest.approx(x["n_concept_dropped"] / x["n_concept"])
    photo = {x["reason"]: x["n_concept_dropped"] for x in rules if x["concept"] == "photo" and x["measure"] == "caption"}
    direct = dict(con.execute(
        f"SELECT {cv.REASON_SQL} AS reason, count(*) FROM samples s JOIN decisions d USING (key) "
        "WHERE s.status = 'success' AND coalesce(s.caption, '') <> '' AND d.state <> 'selected' "
        r"AND regexp_matches(lower(s.caption), '\b(photo|photos)\b') GROUP BY ALL").fetchall())
    assert {k: v for k, v in photo.items() if v} == direct and sum(direct.values()) > 0
    assert "max_text_area" in photo  # every reason of the run is listed, even where it dropped none
    s = cv.sentence(next(x for x in rules if x["concept"] == "photo" and x["reason"] == "max_text_area"))
    assert s.startswith("the max_text_area rule dropped") and "overall" in s


def test_clip_measure_is_labelled_tiny_and_section_says_so(run, tmp_path):
    p = tmp_path / "concepts.csv"
    p.write_text("concept,terms,prompt\npets,dog|cat,a photo of a dog\nphoto,photo,\n")
    cov, _ = cv.write_coverage(run, p)
    rows = cov.to_pylist()
    clip = [r for r in rows if r["measure"] == "clip"]
    assert [r["concept"] for r in clip] == ["pets"]  # the only concept with a prompt
    assert all(r["tiny"] and r["model"].startswith("tiny:") and r["weights_sha256"] == "tiny" for r in clip)
    assert all(not r["tiny"] and r["model"] == cv.CAPTION_MODEL for r in rows if r["measure"] == "caption")
    html = cv.coverage_section(run)
    assert "tiny random CLIP" in html and "not meaningful" in html and html.count("<svg") == 2
    assert "correlated, not causal" in html and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def _numpy_clip_count(run, prompt: str, threshold: float) -> tuple[int, int]:
    """Independent count: every saved embedding, its decision, cosine to the prompt, all in memory."""
    from t2i_curate.filters.clip import encode_texts
    from t2i_curate.filters.semdedup import saved_embeddings

    parquets, files, models = saved_embeddings(run)
    text = encode_texts(cv.text_clip(run, models[0]), [prompt]).numpy()[0]
    states = dict(open_run(run).execute("SELECT key, state FROM decisions").fetchall())
    before = after = 0
    for pqf, npy in zip(parquets, files, strict=True):
        e = np.load(npy).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        for r in pq.read_table(pqf, columns=["key", "embedding_row"]).to_pylist():
            if r["embedding_row"] is not None and e[r["embedding_row"]] @ text >= threshold:
                before += 1
                after += states[r["key"]] == "selected"
    return before, after


def test_clip_chunks_give_the_same_counts_as_one_pass_and_numpy(run):
    pets = [cv.Concept("pets", "category", "pets", (), ("a photo of a dog",))]
    con = open_run(run)
    whole = cv.clip_counts(run, con, pets, -1.0, chunk_rows=10**6)
    # a threshold at the median cosine (tiny CLIP): about half the images, so the count is not trivial
    from t2i_curate.filters.clip import encode_texts
    from t2i_curate.filters.semdedup import saved_embeddings

    _, files, models = saved_embeddings(run)
    text = encode_texts(cv.text_clip(run, models[0]), ["a photo of a dog"]).numpy()[0]
    cos = np.concatenate([np.load(f).astype(np.float32) @ text / np.linalg.norm(np.load(f).astype(np.float32), axis=1)
                          for f in files])
    thr = float(np.median(cos))
    big = cv.clip_counts(run, con, pets, thr, chunk_rows=10**6)
    small = cv.clip_counts(run, con, pets, thr, chunk_rows=3)
    assert np.array_equal(big.counts, small.counts) and np.array_equal(big.totals, small.totals)
    assert whole.counts.sum() == whole.totals.sum() == len(cos)  # threshold -1: every image
    sel = big.reasons.index(None)
    assert (int(big.counts.sum()), int(big.counts[0, sel])) == _numpy_clip_count(run, "a photo of a dog", thr)
    assert 0 < big.counts.sum() < len(cos)


def test_suite_concepts_and_bad_input(tmp_path):
    concepts = cv.suite_concepts()
    by = {c.name: c for c in concepts}
    assert {"horses", "human_limbs", "occupations", "general", "quadrupeds"} <= set(by)
    assert {"horse", "pony", "foal"} <= set(by["horses"].terms) and "hands" in by["human_limbs"].terms
    assert by["occupations-013"].terms == ("police officer", "police officers")
    assert by["occupations-014"].terms == ("secretary", "secretaries")
    assert all(c.terms and c.prompts for c in concepts)  # every built-in prompt has caption terms
    assert len(by["horses"].prompts) == 8 and by["horses-004"].terms == ("foal", "foals")
    assert cv.term_pattern(("stop sign", "a.b")) == r"\b(stop\s+sign|a\.b)\b"
    bad = tmp_path / "c.csv"
    bad.write_text("concept,terms\nhorse,\n")
    with pytest.raises(UserError, match="expected 'concept' and 'terms' and/or 'prompt'"):
        cv.read_concepts(bad)
    bad.write_text("concept,terms\nhorse,horse\nhorse,pony\n")
    with pytest.raises(UserError, match="appears twice"):
        cv.read_concepts(bad)
    with pytest.raises(UserError, match="expected a .jsonl or .csv"):
        cv.read_concepts(tmp_path / "c.txt") if (tmp_path / "c.txt").write_text("x") else None


def test_coverage_before_selection_is_refused(tmp_path):
    from conftest import curate

    (tmp_path / "empty").mkdir()
    r = curate("coverage", tmp_path / "empty", check=False)
    assert r.returncode == 2 and "decisions" in r.stderr
    assert cv.coverage_section(tmp_path / "empty") == ""


def _eval_folder(run, training_run):
    """A small saved eval folder, as measure writes it (metrics.json and the parquet tables)."""
    out = run / "eval" / "t"
    out.mkdir(parents=True, exist_ok=True)
    fails = [("horses", "clip_contrast", 16, 4), ("quadrupeds", "clip_contrast", 8, 1), ("human_limbs", "hands", 12, 6),
             ("human_limbs", "clip_contrast", 32, 3)]
    m = {"model": "tiny", "tag": "t", "tiny_model": True, "n_images": 40, "fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0,
         "fid_protocol": {"protocol": "torch-fidelity", "resize": "r", "feature": "f", "n_generated": 40,
                          "n_reference": 20},
         "clip_score": 20.0, "clip_score_model": "tiny:ViT-L-14/openai", "judges": {}, "labels": None,
         "failures": [{"category": c, "judge": j, "n": n, "failed": k, "rate": k / n, "ci_low": 0.0, "ci_high": 1.0,
                       "unknown": 0, "validated": False} for c, j, n, k in fails],
         "provenance": {"config": {"training_run": training_run}, "seed": 0, "versions": {}}}
    (out / "metrics.json").write_text(json.dumps(m))
    verdicts = [("horses-000", "horses", "failed"), ("horses-000", "horses", "passed"), ("horses-001", "horses", "passed"),
                ("horses-008", "quadrupeds", "failed"), ("people-000", "human_limbs", "passed")]
    pq.write_table(pa.Table.from_pylist([{"prompt_id": p, "category": c, "verdict_clip_contrast": v}
                                         for p, c, v in verdicts]), out / "eval_judgements.parquet")
    pq.write_table(pa.table({"category": pa.array([], pa.string())}), out / "eval_images.parquet")
    pq.write_table(pa.table({"n": pa.array([], pa.int64())}), out / "eval_bias.parquet")
    return out


def test_eval_report_shows_failure_against_coverage(run):
    from t2i_curate.eval.report import build_report

    cv.write_coverage(run)  # the eval suites as concepts
    html = build_report(_eval_folder(run, None))[0].read_text()
    assert "eval.training_run" in html and "curate coverage" in html
    html_path, md_path = build_report(_eval_folder(run, "demo"))  # a run name, under the eval's runs folder
    html, md = html_path.read_text(), md_path.read_text()
    sec = html[html.index("Failure rate against training-data coverage"):]
    assert "correlated, not causal" in sec and "<svg" in sec and "<circle" in sec
    assert sec.count("<circle") >= 3 + 3  # three categories, and the prompts horses-000, horses-001, horses-008
    horses = [r for r in cv.read_coverage(run)[0] if r["concept"] == "horses" and r["measure"] == "caption"][0]
    assert f"<td>horses</td><td>clip_contrast</td><td>0.25 (16)</td><td>{horses['n_after']} (" in sec
    assert "<td>human_limbs</td><td>clip_contrast</td><td>0.09 (32)</td>" in sec  # most images judged wins
    assert "TINY" in sec and "correlated, not causal" in md
    best = cv.best_judges(json.loads((run / "eval" / "t" / "metrics.json").read_text())["failures"])
    assert cv.prompt_failures(run / "eval" / "t", best) == {"horses-000": (0.5, 2), "horses-001": (0.0, 1),
                                                           "horses-008": (1.0, 1), "people-000": (0.0, 1)}
