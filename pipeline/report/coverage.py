"""Concept coverage of a run: how much of the data covers each eval concept, before and after selection.

A concept is an eval category or an eval prompt (the built-in suites ``people``, ``horses``,
``occupations``, ``general``), or a row of a ``--concepts`` file. Two measures:

- ``caption``: a word-boundary, case-insensitive match of the concept's terms in the caption
  (DuckDB ``regexp_matches(lower(caption), '\\b(horse|horses)\\b')``, RE2). Population: every
  downloaded sample with a non-empty caption ("before"); "after" is the selected (written) ones.
- ``clip``: CLIP text -> image retrieval over the image embeddings the score stage saved, with the
  CLIP that made them: an image covers a concept when its cosine to one of the concept's prompts is
  ``>= threshold``. Population: every sample with a saved embedding. With the tiny stand-in CLIP the
  numbers are computed but every row says ``tiny`` and they mean nothing.

Terms of the built-in suites (derivation): a category's terms are hand-written in
:data:`CATEGORY_TERMS` (``horses`` -> horse, pony, foal, stallion, mare, ... ; ``human_limbs`` -> hand,
finger, thumb, arm, leg, foot, ...; ``occupations`` and ``general`` -> the union of their prompts'
terms); a prompt's terms are its subject noun or action and their plurals, hand-written in
:data:`PROMPT_TERMS`, except occupations: the prompt's ``occupation`` word and its plural.

The per-rule breakdown says, for every reason a sample is not written (each dropping rule, and
``failed: <stage>``), which share of the concept's samples it removed against which share of all
samples: the two tables ``report/coverage.parquet`` and ``report/coverage_rules.parquet`` (catalog
views ``coverage`` and ``coverage_rules``). Coverage and eval failure are correlated, not causal.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import as_path, is_url, read_table
from t2i_curate.pipeline.core.layout import RunLayout

log = logging.getLogger(__name__)

DEFAULT_SUITES = ("people", "horses", "occupations", "general")
# ViT-L/14 (OpenAI) cosines of an image with a short prompt it shows are typically 0.25-0.35, unrelated
# pairs 0.10-0.20 (CLIP scores of matching text-image pairs are reported around 25-32 = 100 x cosine);
# 0.25 keeps images that score like a typical match. Not calibrated here (no real CLIP offline): set
# --clip-threshold for another CLIP (ViT-B/32 cosines run about 0.03 higher).
DEFAULT_CLIP_THRESHOLD = 0.25
DEFAULT_CHUNK_ROWS = 65536
CAPTION_MODEL = "caption word match (DuckDB regexp_matches, word boundaries, lower case)"

CATEGORY_TERMS = {
    "horses": "horse|horses|pony|ponies|foal|foals|stallion|stallions|mare|mares|colt|colts|equine|equestrian",
    "quadrupeds": "dog|dogs|puppy|puppies|cow|cows|cattle|calf|calves|zebra|zebras|deer|fawn|fawns",
    "human_limbs": "hand|hands|finger|fingers|thumb|thumbs|palm|palms|fist|fists|arm|arms|elbow|elbows|"
                   "leg|legs|knee|knees|foot|feet",
}
PROMPT_TERMS = {
    "general-000": "cube|cubes|sphere|spheres", "general-001": "apple|apples",
    "general-002": "bicycle|bicycles|bike|bikes", "general-003": "lighthouse|lighthouses",
    "general-004": "ramen", "general-005": "city street|city streets|street at night|rainy street",
    "general-006": "astronaut|astronauts", "general-007": "stop sign|stop signs",
    "general-008": "clock tower|clock towers", "general-009": "sailboat|sailboats|sailing boat",
    "general-010": "cat|cats|kitten|kittens", "general-011": "vintage car|vintage cars|classic car|classic cars",
    "horses-000": "horse|horses", "horses-001": "galloping|gallop", "horses-002": "riding a horse|horseback|rider",
    "horses-003": "show jumping|jumping horse|horse jumping", "horses-004": "foal|foals",
    "horses-005": "horses", "horses-006": "cowboy|cowboys", "horses-007": "brown horse|brown horses",
    "horses-008": "dog|dogs|puppy|puppies", "horses-009": "cow|cows|cattle", "horses-010": "zebra|zebras",
    "horses-011": "deer",
    "people-000": "waving|wave", "people-001": "coffee cup|coffee cups|mug|mugs",
    "people-002": "cartwheel|cartwheels", "people-003": "dunk|slam dunk|basketball player|basketball players",
    "people-004": "pianist|pianists|playing the piano|playing piano", "people-005": "shaking hands|handshake",
    "people-006": "yoga|warrior pose", "people-007": "cross-legged|cross legged", "people-008": "thumbs up",
    "people-009": "runner|runners|finish line", "people-010": "typing|keyboard|laptop",
    "people-011": "chopping|cutting vegetables", "people-012": "pirouette|ballerina|ballet dancer",
    "people-013": "knitting", "people-014": "climbing|climber|climbers|bouldering",
    "people-015": "guitarist|guitarists|playing guitar|playing the guitar",
}


@dataclass(frozen=True)
class Concept:
    """One concept: caption ``terms`` (lower case, any of them matches) and CLIP ``prompts`` (any)."""

    name: str
    kind: str  # category / prompt (a --concepts file may name others)
    category: str
    terms: tuple[str, ...]
    prompts: tuple[str, ...]


def _plural(word: str) -> str:
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


def _split(terms: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.strip().lower() for t in (terms or "").split("|") if t.strip()))


def _prompt_terms(row: dict) -> tuple[str, ...]:
    if row.get("occupation"):
        occ = row["occupation"].lower()
        return (occ, _plural(occ))
    return _split(PROMPT_TERMS.get(row["id"]))


def suite_concepts(suites=DEFAULT_SUITES) -> list[Concept]:
    """Each category and each prompt of the eval suites, with the terms derived as the module says."""
    from t2i_curate.eval.suites import load_suites

    rows = load_suites(list(suites))
    prompts = [Concept(r["id"], "prompt", r["category"], _prompt_terms(r), (r["prompt"],)) for r in rows]
    cats = []
    for cat in dict.fromkeys(r["category"] for r in rows):
        mine = [p for p in prompts if p.category == cat]
        terms = _split(CATEGORY_TERMS.get(cat)) or tuple(dict.fromkeys(t for p in mine for t in p.terms))
        cats.append(Concept(cat, "category", cat, terms, tuple(p.prompts[0] for p in mine)))
    return cats + prompts


def _file_rows(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except ValueError as e:
            raise UserError(f"--concepts {path}: a line is not JSON: {e}") from None
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    raise UserError(f"--concepts {path}: expected a .jsonl or .csv file, got {path.suffix or 'no suffix'}")


def read_concepts(path: str | Path) -> list[Concept]:
    """A concepts file: one row per concept with ``concept`` and ``terms`` ('|'-separated caption words or
    phrases) and/or ``prompt`` (for CLIP); optional ``kind`` (default category) and ``category``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--concepts {path}: no such file")
    out, seen = [], set()
    for i, r in enumerate(_file_rows(path)):
        name, terms, prompt = (str(r.get(k) or "").strip() for k in ("concept", "terms", "prompt"))
        if not name or not (terms or prompt):
            raise UserError(f"--concepts {path} row {i + 1}: expected 'concept' and 'terms' and/or 'prompt', "
                            f"got {sorted(k for k, v in r.items() if v)}")
        if name in seen:
            raise UserError(f"--concepts {path} row {i + 1}: concept {name!r} appears twice")
        seen.add(name)
        out.append(Concept(name, str(r.get("kind") or "category"), str(r.get("category") or name),
                           _split(terms), (prompt,) if prompt else ()))
    if not out:
        raise UserError(f"--concepts {path}: no concept rows")
    return out


def term_pattern(terms: tuple[str, ...]) -> str:
    """RE2 pattern matching any term as whole words: ``\\b(horse|horses)\\b`` (spaces match any whitespace)."""
    special = set("\\.^$|?*+()[]{}")
    esc = ["".join("\\" + c if c in special else c for c in t).replace(" ", r"\s+") for t in terms]
    return r"\b(" + "|".join(esc) + r")\b"


def resolve_run(run: str | Path, runs_dir: str | Path | None = None) -> Path:
    """A run folder, or a run name under ``runs_dir``."""
    p = as_path(run)
    if p.is_dir():
        return p
    if runs_dir is not None and (as_path(runs_dir) / str(run)).is_dir():
        return as_path(runs_dir) / str(run)
    raise UserError(f"run {run!s}: expected a run folder or a run name under {runs_dir or 'runs/'}; none found")


# ---- counting ------------------------------------------------------------------------------------

# why a sample is not written (NULL: selected, i.e. written)
REASON_SQL = ("CASE WHEN d.state = 'selected' THEN NULL "
              "ELSE coalesce(d.rule, 'failed: ' || coalesce(d.failed_stage, 'unknown')) END")


@dataclass
class Counts:
    """Samples per (concept, reason): ``counts[c, r]``; ``totals[r]``: the whole population."""

    measure: str
    reasons: list[str | None]  # None: selected (written)
    totals: np.ndarray
    counts: np.ndarray
    concepts: list[Concept]
    model: str
    weights_sha256: str = ""
    tiny: bool = False
    threshold: float | None = None


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _require_decisions(con, run_dir: Path) -> None:
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    missing = {"samples", "decisions"} - views
    if missing:
        raise UserError(f"coverage of {run_dir}: expected downloaded samples and selected/decisions.parquet, "
                        f"missing {', '.join(sorted(missing))}: run `curate run` (or download, score, select) first")


def caption_counts(con, concepts: list[Concept]) -> Counts:
    """One pass over the captions: per reason, the population and each concept's word matches."""
    with_terms = [c for c in concepts if c.terms]
    cols = "".join(f", count_if(regexp_matches(cap, {_sql_str(term_pattern(c.terms))})) AS c{i}"
                   for i, c in enumerate(with_terms))
    rows = con.execute(f"""
WITH pop AS (SELECT lower(s.caption) AS cap, {REASON_SQL} AS reason
             FROM samples s JOIN decisions d USING (key)
             WHERE s.status = 'success' AND coalesce(s.caption, '') <> '')
SELECT reason, count(*) AS n{cols} FROM pop GROUP BY reason ORDER BY reason NULLS FIRST""").fetchall()
    reasons = [r[0] for r in rows]
    counts = np.array([r[2:] for r in rows], np.int64).reshape(len(rows), len(with_terms)).T
    return Counts("caption", reasons, np.array([r[1] for r in rows], np.int64), counts, with_terms,
                  CAPTION_MODEL)


def _run_models_config(run_dir: Path, tiny: bool):
    """The run's own score.models settings (weight locations), with the preset of the embedding CLIP."""
    from t2i_curate.pipeline.core.config import ModelsConfig, load_config

    lay = RunLayout(run_dir)
    mcfg = load_config(str(lay.config)).score.models if lay.config.exists() else ModelsConfig()
    return mcfg.model_copy(update={"preset": "tiny" if tiny else "real"})


def _recorded_sha(run_dir: Path, model: str) -> str | None:
    from t2i_curate.pipeline.core.scores import read_provenance

    for p in read_provenance(run_dir).values():
        if isinstance(p, dict) and p.get("clip") == model and p.get("clip_sha256"):
            return p["clip_sha256"]
    return None


def text_clip(run_dir: Path, model: str):
    """The CLIP that made the run's image embeddings (``model`` as recorded, ``tiny:`` for the stand-in);
    a real one must have the weights' sha256 the scores recorded."""
    from t2i_curate.filters.clip import load_clip

    tiny = model.startswith("tiny:")
    bundle = load_clip(model.removeprefix("tiny:"), _run_models_config(run_dir, tiny))
    want = _recorded_sha(run_dir, model)
    if not tiny and want and want != bundle.sha256:
        raise UserError(f"the embeddings of {run_dir} were made by {model} with weights sha256 {want}; "
                        f"the weights found now have sha256 {bundle.sha256}: point score.models at the same file")
    if not tiny and not want:  # scored before provenance recorded the CLIP's sha256: say so in every output
        log.warning("coverage: %s's scores record no sha256 for %s; the text side uses %s, unchecked against "
                    "the image embeddings' weights", run_dir, model, bundle.sha256)
        bundle.sha256 = f"{bundle.sha256} (unchecked: the scores record none)"
    return bundle


def _prompt_matrix(concepts: list[Concept]) -> tuple[list[str], np.ndarray]:
    """The distinct prompts, and which concept each belongs to (prompts x concepts, float32 0/1)."""
    prompts = list(dict.fromkeys(p for c in concepts for p in c.prompts))
    at = {p: i for i, p in enumerate(prompts)}
    m = np.zeros((len(prompts), len(concepts)), np.float32)
    for j, c in enumerate(concepts):
        m[[at[p] for p in c.prompts], j] = 1
    return prompts, m


def _text_embeddings(bundle, prompts: list[str], batch: int = 256) -> np.ndarray:
    from t2i_curate.filters.clip import encode_texts

    return np.concatenate([encode_texts(bundle, prompts[i:i + batch]).numpy()
                           for i in range(0, len(prompts), batch)]).astype(np.float32)


def _candidates(con, parquets, files):
    """Every sample with a saved embedding, its reason code, and the reasons (code -> reason)."""
    from t2i_curate.filters.semdedup import run_embeddings

    reasons = [r[0] for r in con.execute(
        f"SELECT DISTINCT {REASON_SQL} AS reason FROM decisions d ORDER BY reason NULLS FIRST").fetchall()]
    con.execute("CREATE OR REPLACE TEMP TABLE cov_reasons AS SELECT * FROM (VALUES "
                + ", ".join(f"({i}, {'NULL' if r is None else _sql_str(r)})" for i, r in enumerate(reasons))
                + ") t(code, reason)")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE cov_cand AS
SELECT d.key, row_number() OVER (ORDER BY d.key) AS dd_rank, r.code FROM decisions d
JOIN cov_reasons r ON r.reason IS NOT DISTINCT FROM ({REASON_SQL})""")
    code_of_rank = con.execute("SELECT code FROM cov_cand ORDER BY dd_rank").fetchnumpy()["code"]
    emb, rank = run_embeddings(con, "cov_cand", parquets, files)
    return emb, np.asarray(code_of_rank, np.int32)[rank - 1], reasons


def clip_counts(run_dir: Path, con, concepts: list[Concept], threshold: float,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Counts | None:
    """Images whose cosine to one of a concept's prompts is >= ``threshold``, streamed ``chunk_rows``
    embeddings at a time (resident: one chunk, its similarities, about 32 bytes per candidate (rank, shard, row, reason code) plus DuckDB's fetch copies). None: no embeddings."""
    from t2i_curate.filters.semdedup import saved_embeddings

    with_prompts = [c for c in concepts if c.prompts]
    parquets, files, models = saved_embeddings(run_dir)
    if not files or not with_prompts:
        log.info("coverage: %s", "no saved image embeddings" if not files else "no concept has a prompt")
        return None
    if len(models) > 1:
        raise UserError(f"{run_dir}: the score shards saved embeddings of different CLIPs {models}; "
                        f"re-score the run with one CLIP before measuring coverage")
    bundle = text_clip(run_dir, models[0])
    prompts, member = _prompt_matrix(with_prompts)
    text = _text_embeddings(bundle, prompts)
    emb, codes, reasons = _candidates(con, parquets, files)
    if len(emb) and emb.dim != text.shape[1]:
        raise UserError(f"{run_dir}: image embeddings have {emb.dim} dims, {bundle.name} text embeddings "
                        f"{text.shape[1]}: the embeddings were not made by {models[0]}")
    counts = np.zeros((len(with_prompts), len(reasons)), np.int64)
    for idx, x in emb.chunks(max(1, chunk_rows)):
        hit = ((x @ text.T >= threshold).astype(np.float32) @ member) > 0  # chunk x concepts
        onehot = np.zeros((len(idx), len(reasons)), np.int64)
        onehot[np.arange(len(idx)), codes[idx]] = 1
        counts += hit.T.astype(np.int64) @ onehot
    totals = np.bincount(codes, minlength=len(reasons)).astype(np.int64)
    return Counts("clip", reasons, totals, counts, with_prompts, bundle.name,
                  bundle.provenance()["weights_sha256"], bundle.tiny, threshold)


# ---- tables --------------------------------------------------------------------------------------


def _share(num, den) -> float | None:
    return float(num) / float(den) if den else None


def _tables(c: Counts) -> tuple[list[dict], list[dict]]:
    """``coverage`` rows (one per concept) and ``coverage_rules`` rows (one per concept and reason)."""
    sel = c.reasons.index(None) if None in c.reasons else None
    n_all, n_all_after = int(c.totals.sum()), int(c.totals[sel]) if sel is not None else 0
    common = {"measure": c.measure, "model": c.model, "weights_sha256": c.weights_sha256, "tiny": c.tiny,
              "threshold": c.threshold}
    cov, rules = [], []
    for j, k in enumerate(c.concepts):
        n, n_after = int(c.counts[j].sum()), int(c.counts[j, sel]) if sel is not None else 0
        head = {"concept": k.name, "kind": k.kind, "category": k.category}
        cov.append({**head, **common, "terms": "|".join(k.terms), "prompts": " | ".join(k.prompts),
                    "n_before": n, "n_after": n_after, "population_before": n_all,
                    "population_after": n_all_after, "share_before": _share(n, n_all),
                    "share_after": _share(n_after, n_all_after), "dropped_share": _share(n - n_after, n),
                    "dropped_share_overall": _share(n_all - n_all_after, n_all)})
        for r, reason in enumerate(c.reasons):
            if reason is None:
                continue
            share, overall = _share(c.counts[j, r], n), _share(c.totals[r], n_all)
            rules.append({**head, **common, "reason": reason, "n_concept": n,
                          "n_concept_dropped": int(c.counts[j, r]), "concept_dropped_share": share,
                          "n_all": n_all, "n_all_dropped": int(c.totals[r]), "all_dropped_share": overall,
                          "ratio": share / overall if share is not None and overall else None})
    return cov, rules


_COMMON = [("concept", "string"), ("kind", "string"), ("category", "string"), ("measure", "string"),
           ("model", "string"), ("weights_sha256", "string"), ("tiny", "bool"), ("threshold", "float64")]
COVERAGE_SCHEMA = _COMMON + [
    ("terms", "string"), ("prompts", "string"), ("n_before", "int64"), ("n_after", "int64"),
    ("population_before", "int64"), ("population_after", "int64"), ("share_before", "float64"),
    ("share_after", "float64"), ("dropped_share", "float64"), ("dropped_share_overall", "float64")]
RULES_SCHEMA = _COMMON + [
    ("reason", "string"), ("n_concept", "int64"), ("n_concept_dropped", "int64"),
    ("concept_dropped_share", "float64"), ("n_all", "int64"), ("n_all_dropped", "int64"),
    ("all_dropped_share", "float64"), ("ratio", "float64")]


def _arrow(rows: list[dict], schema, meta: dict):
    import pyarrow as pa

    sch = pa.schema([(n, getattr(pa, "bool_" if t == "bool" else t)()) for n, t in schema])
    return pa.Table.from_pylist(rows, schema=sch).replace_schema_metadata(
        {b"t2i_curate": json.dumps(meta).encode()})


def compute_coverage(run_dir: str | Path, concepts: list[Concept] | None = None,
                     threshold: float = DEFAULT_CLIP_THRESHOLD, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                     source: str = "eval suites " + ", ".join(DEFAULT_SUITES)):
    """(coverage table, coverage_rules table) as pyarrow Tables; nothing is written."""
    from t2i_curate.pipeline.core.catalog import open_run

    run_dir = as_path(run_dir)
    concepts = concepts if concepts is not None else suite_concepts()
    con = open_run(run_dir)
    try:
        _require_decisions(con, run_dir)
        measured = [caption_counts(con, concepts), clip_counts(run_dir, con, concepts, threshold, chunk_rows)]
    finally:
        con.close()
    cov, rules = [], []
    for c in (m for m in measured if m is not None):
        a, b = _tables(c)
        cov += a
        rules += b
    meta = {"concepts": source, "clip_threshold": threshold, "chunk_rows": chunk_rows,
            "caption_population": "downloaded samples with a non-empty caption",
            "clip_population": "downloaded samples with a saved image embedding",
            "after": "selected (written) samples", "note": "coverage and failure are correlated, not causal"}
    return _arrow(cov, COVERAGE_SCHEMA, meta), _arrow(rules, RULES_SCHEMA, meta)


def write_coverage(run_dir: str | Path, concepts_file: str | Path | None = None,
                   threshold: float = DEFAULT_CLIP_THRESHOLD, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """``curate coverage``: compute, write ``report/coverage.parquet`` and ``report/coverage_rules.parquet``
    atomically (rules first: coverage.parquet marks the pair done), refresh the catalog; return both tables."""
    from t2i_curate.pipeline.core.catalog import refresh_catalog
    from t2i_curate.pipeline.core.io import write_parquet

    run_dir = as_path(run_dir)
    if not -1 <= threshold <= 1 or chunk_rows < 1:
        raise UserError(f"coverage: expected a CLIP threshold in [-1, 1] and chunk rows >= 1, got {threshold} "
                        f"and {chunk_rows}")
    concepts = read_concepts(concepts_file) if concepts_file else None
    kw = {"source": str(Path(concepts_file).resolve())} if concepts_file else {}
    cov, rules = compute_coverage(run_dir, concepts, threshold, chunk_rows, **kw)
    lay = RunLayout(run_dir)
    write_parquet(lay.coverage_rules_file, rules)
    write_parquet(lay.coverage_file, cov)
    refresh_catalog(run_dir)
    return cov, rules


def read_coverage(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """The saved coverage rows and rule rows ([] when ``curate coverage`` never ran)."""

    lay = RunLayout(run_dir)
    if not lay.coverage_file.exists():
        return [], []
    rules = read_table(lay.coverage_rules_file).to_pylist() if lay.coverage_rules_file.exists() else []
    return read_table(lay.coverage_file).to_pylist(), rules


def disproportionate(rules: list[dict], min_ratio: float = 1.5, min_concept: int = 20) -> list[dict]:
    """Rule rows where a rule removed a concept at least ``min_ratio`` times its overall rate, among concepts
    with at least ``min_concept`` samples before selection; largest ratio first."""
    out = [r for r in rules if r["ratio"] is not None and r["ratio"] >= min_ratio and r["n_concept"] >= min_concept]
    return sorted(out, key=lambda r: -r["ratio"])


def sentence(r: dict) -> str:
    """'the max_text_area rule dropped 31% of horses images (caption) against 12% overall'."""
    what = r["reason"] if r["reason"].startswith("failed") else f"the {r['reason']} rule"
    tiny = ", tiny CLIP: not meaningful" if r["tiny"] else ""
    return (f"{what} dropped {r['concept_dropped_share']:.0%} of {r['concept']} images ({r['measure']}{tiny}, "
            f"{r['n_concept_dropped']} of {r['n_concept']}) against {r['all_dropped_share']:.0%} overall")


# ---- showing it ----------------------------------------------------------------------------------


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def print_coverage(cov: list[dict], rules: list[dict]) -> None:
    """The category rows as a rich table (prompt rows are in the parquet), then the disproportionate rules."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="concept coverage (categories; prompts in report/coverage.parquet)")
    for h in ("concept", "measure", "before", "after", "dropped", "dropped overall", "model"):
        t.add_column(h, justify="left" if h in ("concept", "measure", "model") else "right")
    for r in (r for r in cov if r["kind"] != "prompt"):
        t.add_row(r["concept"], r["measure"], f"{r['n_before']} ({_pct(r['share_before'])})",
                  f"{r['n_after']} ({_pct(r['share_after'])})", _pct(r["dropped_share"]),
                  _pct(r["dropped_share_overall"]),
                  "TINY: not meaningful" if r["tiny"] else "word match" if r["measure"] == "caption" else r["model"])
    console = Console(stderr=True)
    console.print(t)
    for r in disproportionate([r for r in rules if r["kind"] != "prompt"])[:10]:
        console.print("  " + sentence(r))


def _bar_pairs(rows: list[dict], width: int = 560) -> str:
    """SVG: per concept, its share of the data before (grey) and after (blue) selection."""
    vmax = max([r[k] or 0 for r in rows for k in ("share_before", "share_after")] + [1e-9])
    pad, h, out = 150, 30, []
    for i, r in enumerate(rows):
        y = i * h + 4
        for j, (k, colour) in enumerate((("share_before", "#aaa"), ("share_after", "#4a7fb5"))):
            w = (width - pad - 60) * (r[k] or 0) / vmax
            out.append(f'<rect x="{pad}" y="{y + j * 11}" width="{w:.1f}" height="10" fill="{colour}"/>'
                       f'<text x="{pad + w + 4:.1f}" y="{y + j * 11 + 9}" font-size="10">{_pct(r[k])}</text>')
        out.append(f'<text x="0" y="{y + 15}" font-size="12">{html.escape(r["concept"][:22])}</text>')
    return (f'<svg width="{width}" height="{len(rows) * h + 8}" xmlns="http://www.w3.org/2000/svg" '
            f'role="img">{"".join(out)}</svg>')


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def _coverage_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["concept"], r["measure"] + (" (TINY)" if r["tiny"] else ""), r["terms"] or r["prompts"][:60],
             f"{r['n_before']} ({_pct(r['share_before'])})", f"{r['n_after']} ({_pct(r['share_after'])})",
             f"{_pct(r['dropped_share'])} vs {_pct(r['dropped_share_overall'])}"] for r in rows]


def coverage_section(run_dir: str | Path) -> str:
    """The curation report's coverage section: a self-contained HTML fragment (inline SVG), or "" when
    ``curate coverage`` has not run for ``run_dir``."""
    cov, rules = read_coverage(run_dir)
    if not cov:
        return ""
    head = ["concept", "measure", "terms / prompt", "before (share)", "after (share)", "dropped vs overall"]
    cats = [r for r in cov if r["kind"] != "prompt"]
    parts = ["<section id='coverage'><h2>Concept coverage</h2>",
             "<p>How much of the run covers each eval concept, before selection (downloaded) and after "
             "(written): caption words matched on word boundaries, and CLIP text-to-image retrieval over the "
             "saved image embeddings (an image covers a concept when its cosine to one of the concept's "
             "prompts reaches the threshold). Coverage and eval failure are correlated, not causal.</p>"]
    clip = next((r for r in cov if r["measure"] == "clip"), None)
    if clip:
        parts.append(f"<p>CLIP measure: {html.escape(clip['model'])} (weights sha256 "
                     f"{html.escape(clip['weights_sha256'])}), cosine &gt;= {clip['threshold']}.</p>")
        if clip["tiny"]:
            parts.append("<p style='background:#fee;padding:.4em'><b>The CLIP measure ran on a tiny random "
                         "CLIP: its numbers are not meaningful.</b></p>")
    for measure in dict.fromkeys(r["measure"] for r in cats):
        mine = [r for r in cats if r["measure"] == measure]
        label = measure + (" (tiny: not meaningful)" if mine[0]["tiny"] else "")
        parts.append(f"<h3>Share of the data, {html.escape(label)}: before (grey) and after (blue)</h3>"
                     + _bar_pairs(mine))
    parts.append(_html_table(head, _coverage_rows(cats)))
    worst = disproportionate(rules, min_concept=5)[:12]
    parts.append("<h3>Rules that removed a concept disproportionately</h3>" + (
        "<ul>" + "".join(f"<li>{html.escape(sentence(r))}</li>" for r in worst) + "</ul>" if worst else
        "<p>No rule removed any concept (with 5 or more samples) at 1.5 times its overall rate or more.</p>"))
    prompts = [r for r in cov if r["kind"] == "prompt"]
    if prompts:
        parts.append(f"<details><summary>{len(prompts)} prompt rows</summary>"
                     + _html_table(head, _coverage_rows(prompts)) + "</details>")
    return "".join(parts) + "</section>"


# ---- the eval report's link: failure rate next to training coverage -----------------------------

JUDGE_PREFERENCE = ("probe", "vqa", "hands", "pose", "clip_contrast")
CORRELATION_NOTE = ("Coverage and failure are correlated, not causal: a concept that is rare in the training "
                    "data and fails often does not show that more such data would fix it (prompt difficulty, "
                    "judge errors and caption quality move both).")


def best_judges(failures: list[dict]) -> dict[str, dict]:
    """Per category, the failure row of the best judge available: a judge validated on labels first, then
    the one that judged the most images, then the order probe, vqa, hands, pose, clip_contrast."""
    rank = {j: i for i, j in enumerate(JUDGE_PREFERENCE)}
    best: dict[str, dict] = {}
    for f in failures:
        if not f.get("n") or f.get("rate") is None:
            continue
        key = lambda g: (not g.get("validated"), -g["n"], rank.get(g["judge"], len(rank)))  # noqa: E731
        if f["category"] not in best or key(f) < key(best[f["category"]]):
            best[f["category"]] = f
    return best


def prompt_failures(out_dir: Path, best: dict[str, dict]) -> dict[str, tuple[float, int]]:
    """Per prompt id: (failure rate, images judged) by its category's best judge (eval_judgements verdicts)."""
    import duckdb

    path = Path(out_dir) / "eval_judgements.parquet"
    if not path.exists() or not best:
        return {}
    cols = {r[0] for r in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet({_sql_str(str(path))})").fetchall()}
    out = {}
    for cat, f in best.items():
        col = f"verdict_{f['judge']}"
        if col not in cols:
            continue
        for pid, failed, n in duckdb.execute(
                f"SELECT prompt_id, count_if({col} = 'failed'), count_if({col} IN ('failed', 'passed')) "
                f"FROM read_parquet(?) WHERE category = ? GROUP BY prompt_id", [str(path), cat]).fetchall():
            if n:
                out[pid] = (failed / n, n)
    return out


def _scatter(points: list[tuple[str, float, float, bool]], width: int = 560, height: int = 340) -> str:
    """SVG scatter: x coverage share, y failure rate; categories filled and labelled, prompts hollow."""
    left, bottom, top, right = 50, 40, 10, 20
    xmax = max([p[1] for p in points] + [1e-9]) * 1.05
    sx = lambda x: left + (width - left - right) * x / xmax  # noqa: E731
    sy = lambda y: top + (height - top - bottom) * (1 - y)  # noqa: E731
    out = [f'<line x1="{left}" y1="{sy(0)}" x2="{width - right}" y2="{sy(0)}" stroke="#222"/>',
           f'<line x1="{left}" y1="{sy(0)}" x2="{left}" y2="{top}" stroke="#222"/>']
    for t in (0, 0.5, 1):
        out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" font-size="10" text-anchor="end">{t:.1f}</text>'
                   f'<text x="{sx(xmax * t):.1f}" y="{sy(0) + 14:.1f}" font-size="10" text-anchor="middle">'
                   f'{xmax * t:.1%}</text>')
    out.append(f'<text x="{(left + width) / 2}" y="{height - 6}" font-size="11" text-anchor="middle">share of the '
               f'written training data matching the concept (captions)</text><text x="12" y="{top + 120}" '
               f'font-size="11" transform="rotate(-90 12 {top + 120})">failure rate</text>')
    for label, x, y, is_cat in points:
        fill, r = ("#c0392b", 5) if is_cat else ("none", 3.5)
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{fill}" stroke="#c0392b">'
                   f'<title>{html.escape(label)}: coverage {x:.2%}, failure {y:.2f}</title></circle>')
        if is_cat:
            out.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) + 4:.1f}" font-size="11">{html.escape(label)}</text>')
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img">'
            f'{"".join(out)}</svg>')


def _training_run(out_dir: Path, m: dict) -> tuple[Path | None, str]:
    """The eval's ``eval.training_run`` as a folder, or None and why not."""
    name = ((m.get("provenance") or {}).get("config") or {}).get("training_run")
    if not name:
        return None, ("No training run set: set <code>eval.training_run</code> to the curated run the model was "
                      "trained on (a run folder or a run name, e.g. <code>--set eval.training_run=demo</code>), "
                      "run <code>curate coverage RUN</code> on it, then rebuild this report.")
    try:
        # runs/<run>/eval/<tag>: a name is looked up beside the evaluated run; an eval of a run on an object
        # store was made in a local working folder, so there the evaluated run's URL says where
        evaluated = (m.get("provenance") or {}).get("run_dir") or ""
        base = as_path(evaluated).parent if is_url(evaluated) else Path(out_dir).resolve().parent.parent.parent
        run = resolve_run(name, base)
    except UserError as e:
        return None, html.escape(str(e))
    if not RunLayout(run).coverage_file.exists():
        return None, (f"eval.training_run is {html.escape(str(run))}, which has no coverage yet: run "
                      f"<code>curate coverage {html.escape(str(run))}</code>, then rebuild this report.")
    return run, ""


def _link_points(cov: list[dict], best: dict[str, dict], per_prompt: dict) -> list[tuple[str, float, float, bool]]:
    caption = {r["concept"]: r for r in cov if r["measure"] == "caption" and r["share_after"] is not None}
    points = [(c, caption[c]["share_after"], f["rate"], True) for c, f in best.items() if c in caption]
    points += [(p, caption[p]["share_after"], rate, False) for p, (rate, _) in per_prompt.items() if p in caption]
    return points


def _correlation(points) -> str:
    xs, ys = np.array([p[1] for p in points]), np.array([p[2] for p in points])
    if len(points) < 3 or xs.std() == 0 or ys.std() == 0:
        return "too few distinct points for a correlation"
    return f"Pearson r = {np.corrcoef(xs, ys)[0, 1]:.2f} over {len(points)} points (categories and prompts)"


def eval_coverage_section(out_dir: str | Path, m: dict) -> tuple[list[str], list[str]]:
    """The eval report's section (HTML parts, Markdown lines): per category the failure rate of its best
    judge next to the training run's coverage, and a scatter over categories and prompts (>= 3 points)."""
    run, why = _training_run(Path(out_dir), m)
    title = "<h2>Failure rate against training-data coverage</h2>"
    if run is None:
        return [title, f"<p>{why}</p>"], ["", "## Failure rate against training-data coverage", "",
                                          html.unescape(why).replace("<code>", "`").replace("</code>", "`")]
    cov, _ = read_coverage(run)
    best = best_judges(m.get("failures") or [])
    by = {(r["concept"], r["measure"]): r for r in cov}
    head = ["category", "judge", "failure rate (N judged)", "caption coverage after (share)",
            "caption coverage before (share)", "CLIP coverage after (share)"]
    rows = []
    for cat, f in best.items():
        cap, clip = by.get((cat, "caption")), by.get((cat, "clip"))
        rows.append([cat, f["judge"] + (" (validated)" if f.get("validated") else ""), f"{f['rate']:.2f} ({f['n']})",
                     f"{cap['n_after']} ({_pct(cap['share_after'])})" if cap else "not measured",
                     f"{cap['n_before']} ({_pct(cap['share_before'])})" if cap else "not measured",
                     (f"{clip['n_after']} ({_pct(clip['share_after'])})" + (" TINY" if clip["tiny"] else ""))
                     if clip else "not measured"])
    points = _link_points(cov, best, prompt_failures(Path(out_dir), best))
    corr = _correlation(points)
    tiny_clip = any(r["tiny"] for r in cov if r["measure"] == "clip")
    parts = [title, f"<p>Training run: {html.escape(str(run))} (<code>curate coverage</code>). The failure rate is "
             "the best judge's per category (validated first, then the most images judged). "
             f"{html.escape(CORRELATION_NOTE)}</p>",
             "<p><b>The CLIP coverage ran on a tiny random CLIP: not meaningful.</b></p>" if tiny_clip else "",
             _html_table(head, rows)]
    if len(points) >= 3:
        parts.append(f"<p>{html.escape(corr)}; descriptive only.</p>" + _scatter(points))
    else:
        parts.append(f"<p>No scatter plot: {len(points)} point(s) with both a failure rate and a caption "
                     "coverage (3 needed).</p>")
    md = ["", "## Failure rate against training-data coverage", "", f"Training run: {run}. {CORRELATION_NOTE}", "",
          "| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|", *["| " + " | ".join(r) + " |" for r in rows],
          "", f"{corr}; descriptive only." + (" CLIP coverage: tiny random CLIP, not meaningful." if tiny_clip else "")]
    return parts, md
