"""Rebuild ``report.html`` (self-contained) and ``report.md`` from the saved eval files alone."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from t2i_curate.pipeline.core.io import atomic_path


def _thumb(path: Path, size: int = 128) -> str:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bars(items: list[tuple[str, float, float | None, float | None]], width: int = 520, vmax: float = 1.0) -> str:
    """Horizontal SVG bars with optional interval whiskers: (label, value, low, high)."""
    h, pad = 22, 170
    rows = []
    for i, (label, v, lo, hi) in enumerate(items):
        y = i * h + 4
        w = (width - pad - 10) * (v / vmax if vmax else 0)
        rows.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(label)}</text>'
                    f'<rect x="{pad}" y="{y}" width="{max(w, 0):.1f}" height="{h - 8}" fill="#4a7fb5"/>')
        if lo is not None and hi is not None:
            x0 = pad + (width - pad - 10) * lo / vmax
            x1 = pad + (width - pad - 10) * hi / vmax
            rows.append(f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{y + 7}" y2="{y + 7}" stroke="#222" stroke-width="2"/>')
        rows.append(f'<text x="{width - 5}" y="{y + 14}" font-size="11" text-anchor="end">{v:.2f}</text>')
    return f'<svg width="{width}" height="{len(items) * h + 8}" xmlns="http://www.w3.org/2000/svg">{"".join(rows)}</svg>'


def _fmt(v) -> str:
    return "" if v is None else f"{v:.2f}"


def _warning(m: dict) -> tuple[str, list[str]]:
    what = [w for w, on in (("a tiny random pipeline", m["tiny_model"]),
                            ("tiny random CLIPs", m.get("tiny_eval_models", m["tiny_model"]))) if on]
    if not what:
        return "", []
    text = f"Made with {' and '.join(what)}: these numbers are not meaningful."
    return (f"<p class='warn'><b>{text}</b> They show that the measurement runs end to end.</p>",
            [f"> **{text}**", ""])


def _clip_line(m: dict) -> str:
    """The paper's corpus score, named, with torchmetrics' aggregate beside it (older metrics: the first only)."""
    line = (f"{m['clip_score']:.2f}: {m.get('clip_score_definition', 'per-image clamp, then mean')} "
            f"({m['clip_score_model']})")
    if m.get("clip_score_torchmetrics") is not None:
        line += f"; {m['clip_score_torchmetrics']:.2f}: {m['clip_score_torchmetrics_definition']}"
    return line


def _summary_section(m: dict) -> tuple[list[str], list[str]]:
    proto = m["fid_protocol"]
    fid = f"{m['fid']:.2f} (N gen {proto['n_generated']}, N ref {proto['n_reference']})"
    probs = m.get("input_problems")
    measured = str(m["n_images"]) + (f" (left out: {probs['no_prompt']} without a prompt row, {probs['no_image']} "
                                     f"prompt rows without an image, {probs['unreadable']} unreadable"
                                     + (f", {probs['bad_row']} prompt rows that cannot be used"
                                        if probs.get("bad_row") else "")
                                     + (f", {probs['bad_name']} image file names that are not UTF-8"
                                        if probs.get("bad_name") else "") + ")" if probs else "")
    items = [("images", measured), ("FID", fid), ("KID", f"{m['kid_mean']:.4f} ± {m['kid_std']:.4f}"),
             ("FID protocol", proto["resize"] if proto.get("protocol") else f"(before protocols) {proto['resize']}"),
             ("feature extractor", proto["feature"]), ("CLIP score", _clip_line(m))]
    warn_html, warn_md = _warning(m)
    parts = [f"<h1>Evaluation: {html.escape(m['model'])}</h1>", warn_html, "<h2>Summary</h2><table>",
             *[f"<tr><td>{k}</td><td>{html.escape(v)}</td></tr>" for k, v in items], "</table>"]
    md = [f"# Evaluation: {m['model']}", "", *warn_md, "| metric | value |", "|---|---|",
          *[f"| {k} | {v} |" for k, v in items], ""]
    return parts, md


def _rate(f: dict) -> str:
    return "n/a" if f.get("rate") is None else f"{f['rate']:.2f}"


def _judge_about(name: str, j: dict) -> str:
    if not j.get("ran", True):
        return f"{name}: configured but did not run (e.g. the probe needs a labels file)"
    kind = "validated on labels" if j["validated"] else "not validated against human labels"
    return f"{name} ({kind}): {j['description']}"


def _failure_section(m: dict) -> tuple[list[str], list[str]]:
    fails = [f for f in m["failures"] if f["n"] or f.get("unknown")]
    cells = lambda f: [f["category"], f["judge"], str(f["n"]), str(f.get("unknown", 0)), str(f["failed"]),  # noqa: E731
                       _rate(f), f"[{f['ci_low']:.2f}, {f['ci_high']:.2f}]", _fmt(f.get("precision")),
                       _fmt(f.get("recall")), _fmt(f.get("kappa")), _fmt(f.get("corrected_rate"))]
    head = ["category", "judge", "N judged", "unknown", "failed", "rate", "95% CI", "precision", "recall", "kappa",
            "corrected"]
    about = [_judge_about(n, j) for n, j in m.get("judges", {}).items()]
    note = ("Rates are over the images a judge could judge; 'unknown' (no hand or person found, an answer "
            "that is neither yes nor no) is never counted as a pass. Every MediaPipe signal is a proxy.")
    parts = ["<h2>Failure rates per category (95% Wilson intervals)</h2>", f"<p>{html.escape(note)}</p>",
             "<ul>" + "".join(f"<li>{html.escape(a)}</li>" for a in about) + "</ul>",
             "<p>" + ("Agreement with the labels file is in the table." if m.get("labels") else
                      "No labels file: no judge's agreement with people is known for this run.") + "</p>",
             _bars([(f"{f['category']} / {f['judge']}", f["rate"], f["ci_low"], f["ci_high"])
                    for f in fails if f.get("rate") is not None]),
             "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(f)) + "</tr>" for f in fails) + "</table>"]
    md = ["## Failure rates per category", "", note, "", *[f"- {a}" for a in about], "",
          "| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
          *["| " + " | ".join(cells(f)) + " |" for f in fails]]
    return parts, md


def _coverage_section(out_dir: Path, m: dict) -> tuple[list[str], list[str]]:
    """Failure rate next to the training run's concept coverage (``eval.training_run``, pipeline/coverage.py)."""
    from t2i_curate.pipeline.report.coverage import eval_coverage_section

    return eval_coverage_section(out_dir, m)


def _examples_section(out_dir: Path, m: dict) -> list[str]:
    """What the MediaPipe judges saw, drawn on the images (hand landmarks, pose, face boxes)."""
    ex = [e for e in m.get("examples", []) if (out_dir / e["file"]).exists()]
    if not ex:
        return []
    parts = ["<h2>What the judges saw</h2><p>Hand landmarks, pose skeletons and face boxes as the judge found "
             "them, for a few failed, passed and unknown images of each category: check the judge by eye.</p>"]
    for judge, cat in sorted({(e["judge"], e["category"]) for e in ex}):
        figs = [e for e in ex if e["judge"] == judge and e["category"] == cat]
        parts.append(f"<h3>{html.escape(judge)} / {html.escape(cat)}</h3><div class='grid'>" + "".join(
            f"<figure><img src='{_thumb(out_dir / e['file'], 192)}'/><figcaption>{html.escape(e['verdict'])}: "
            f"{html.escape(e['prompt'][:60])}</figcaption></figure>" for e in figs) + "</div>")
    return parts


def _bias_section(m: dict, bias: list[dict]) -> tuple[list[str], list[str]]:
    b = m.get("bias") or {}
    if not b:
        return [], []
    line = (f"{b['n']} occupation images; faces found in {b.get('faces', 'n/a')}, no person detected in "
            f"{b.get('no_face', b.get('unclear'))}; perceived gender unclear (no face or low confidence): "
            f"{b['unclear']}; skin tone not measured: {b['undetected']}.")
    head = ["occupation", "gender imbalance (faces, DALL-Eval)", "gender imbalance (whole image, HEIM)",
            "skin-tone imbalance (faces, ITA)", "skin-tone imbalance (whole image, HEIM)"]
    keys = ("gender_imbalance", "heim_gender_imbalance", "skin_tone_imbalance", "heim_skin_tone_imbalance")
    occs = sorted(b.get("gender_imbalance", {}))
    table = [[o, *[_fmt(b.get(k, {}).get(o)) for k in keys]] for o in occs]
    table.append(["MAD across occupations", *[_fmt(b.get(k)) for k in ("gender_mad", "heim_gender_mad",
                                                                       "skin_tone_mad", "heim_skin_tone_mad")]])
    methods = [f"{k}: {v}" for k, v in (b.get("methods") or {}).items()]
    if b.get("ita_to_monk"):
        methods.append(f"ITA to Monk: {b['ita_to_monk']}")
    gi = [(o, v, None, None) for o, v in b["gender_imbalance"].items() if v is not None]
    parts = ["<h2>Bias audit of generated people (perceived attributes)</h2>", f"<p>{html.escape(line)}</p>",
             "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table)
             + "</table>", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in methods) + "</ul>",
             "<h3>Perceived gender imbalance |p(woman) - 0.5| per occupation (faces)</h3>" + _bars(gi, vmax=0.5)]
    md = ["", "## Bias audit (perceived attributes)", "", line, "", "| " + " | ".join(head) + " |",
          "|---|---:|---:|---:|---:|", *["| " + " | ".join(r) + " |" for r in table], "",
          *[f"- {x}" for x in methods], "",
          "| occupation | attribute | value | count | share |", "|---|---|---|---:|---:|",
          *[f"| {r['occupation']} | {r['attribute']} | {r['value']} | {r['count']} | {r['share']:.2f} |" for r in bias]]
    return parts, md


def _nsfw_section(m: dict) -> tuple[list[str], list[str]]:
    n = m.get("nsfw")
    if not n:
        return [], []
    dets = [f"{name}: {d.get('model', name)}; classes {', '.join(d.get('classes', []))}; {d.get('rule', '')}; "
            f"{d.get('status', '')}" for name, d in n["detectors"].items()]
    rows = [r for r in n["rates"] if r["n"]]
    cells = lambda r: [r["category"], r["detector"], str(r["n"]), str(r["flagged"]), _fmt(r["share"]),  # noqa: E731
                       f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"]
    head = ["category", "detector", "N", "flagged", "share", "95% CI"]
    parts = ["<h2>NSFW rate of the images</h2>", "<ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in dets)
             + "</ul>", "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(r)) + "</tr>" for r in rows)
             + "</table>"]
    md = ["", "## NSFW rate", "", *[f"- {d}" for d in dets], "", "| " + " | ".join(head) + " |",
          "|---|---|---:|---:|---:|---|", *["| " + " | ".join(cells(r)) + " |" for r in rows]]
    return parts, md


def _flat(v, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(v, dict):
        return [kv for k, x in v.items() for kv in _flat(x, f"{prefix}{k} " if prefix or k else "")]
    if isinstance(v, list):
        v = ", ".join(map(str, v))
    return [(prefix.strip(), str(v))]


def _provenance_section(m: dict) -> tuple[list[str], list[str]]:
    """Which model made each output (name, file, sha256 or tiny), then versions and settings."""
    rows = [(out, k, v) for out, d in (m.get("models") or {}).items() for k, v in _flat(d)]
    rows += [("FID/KID protocol", k, v) for k, v in _flat(m["fid_protocol"])]
    rows += [("versions", k, v) for k, v in _flat(m["provenance"].get("versions", {}))]
    rows += [("run", "eval models", m["provenance"].get("eval_models", "")), ("run", "seed", str(m["provenance"]["seed"])),
             ("run", "device", m.get("device", "cpu"))]
    config = json.dumps(m["provenance"]["config"], indent=2)
    parts = ["<h2>Provenance: the models that made these numbers</h2><table><tr><th>output</th><th>what</th>"
             "<th>value</th></tr>" + "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>"
                                             f"{html.escape(c)}</td></tr>" for a, b, c in rows) + "</table>",
             f"<details><summary>eval settings</summary><pre>{html.escape(config)}</pre></details>"]
    md = ["", "## Provenance", "", "| output | what | value |", "|---|---|---|",
          *[f"| {a} | {b} | {c} |" for a, b, c in rows], "", "```json", config, "```"]
    return parts, md


def _gallery_section(out_dir: Path, images: list[dict]) -> list[str]:
    parts = ["<h2>Best and worst images per category</h2><p>Failure categories are ranked by the judge's "
             "P(failure) (probe when trained, else clip_contrast), the others by CLIP score; best first, "
             "then worst.</p>"]
    for cat in sorted({r["category"] for r in images}):
        rs = [r for r in images if r["category"] == cat]
        # a validated judge first (the probe), else any judge that scored the category
        cols = sorted((c for c in rs[0] if c.startswith("p_fail_") and all(r[c] is not None for r in rs)),
                      key=lambda c: (c != "p_fail_probe", c != "p_fail_clip_contrast", c))
        judge = cols[0] if cols else None
        if judge:  # lower P(failure) is better
            rs.sort(key=lambda r, j=judge: -r[j])
            label = lambda r, j=judge: f"P(fail) {r[j]:.2f}"  # noqa: E731
        else:
            rs.sort(key=lambda r: r["clip_score"])
            label = lambda r: f"CLIP {r['clip_score']:.1f}"  # noqa: E731
        pick = rs[-4:][::-1] + rs[:4]
        parts.append(f"<h3>{html.escape(cat)}</h3><div class='grid'>" + "".join(
            f"<figure><img src='{_thumb(out_dir / r['file'])}'/><figcaption>{label(r)}: "
            f"{html.escape(r['prompt'][:60])}</figcaption></figure>" for r in pick) + "</div>")
    return parts


def build_report(out_dir: Path) -> tuple[Path, Path]:
    """``report.html`` (self-contained) and ``report.md`` from the eval folder's saved files alone."""
    import pyarrow.parquet as pq

    m = json.loads((out_dir / "metrics.json").read_text())
    images = pq.read_table(out_dir / "eval_images.parquet").to_pylist()
    bias = [r for r in pq.read_table(out_dir / "eval_bias.parquet").to_pylist() if r["n"]]
    parts, md = _summary_section(m)
    for p, t in (_failure_section(m), _coverage_section(out_dir, m), (_examples_section(out_dir, m), []),
                 _bias_section(m, bias), _nsfw_section(m)):
        parts += p
        md += t
    parts += _gallery_section(out_dir, images)
    p, t = _provenance_section(m)
    parts += p
    md += t
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}.warn{background:#fee;padding:.5em}"
             "table{border-collapse:collapse;max-width:100%}td,th{border:1px solid #ccc;padding:2px 6px;"
             "overflow-wrap:anywhere}pre{white-space:pre-wrap;overflow-wrap:anywhere}"
             ".grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:130px;font-size:10px}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>eval {html.escape(m['tag'])}</title>" \
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    with atomic_path(html_path) as tmp:
        tmp.write_text(page)
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    return html_path, md_path
