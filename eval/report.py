"""Rebuild ``report.html`` (self-contained) and ``report.md`` from the saved eval files alone."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from pipeline.io import atomic_path


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


def build_report(out_dir: Path) -> tuple[Path, Path]:
    import pyarrow.parquet as pq

    m = json.loads((out_dir / "metrics.json").read_text())
    images = pq.read_table(out_dir / "eval_images.parquet").to_pylist()
    bias = [r for r in pq.read_table(out_dir / "eval_bias.parquet").to_pylist() if r["n"]]
    warn = ("<p class='warn'><b>Tiny random pipeline and tiny random CLIP: these numbers are not meaningful.</b> "
            "They show that the measurement runs end to end.</p>") if m["tiny_model"] else ""
    proto = m["fid_protocol"]
    parts = [f"<h1>Evaluation: {html.escape(m['model'])}</h1>", warn,
             "<h2>Summary</h2><table>",
             f"<tr><td>images</td><td>{m['n_images']}</td></tr>",
             f"<tr><td>FID</td><td>{m['fid']:.2f} (N gen {proto['n_generated']}, N ref {proto['n_reference']})</td></tr>",
             f"<tr><td>KID</td><td>{m['kid_mean']:.4f} ± {m['kid_std']:.4f}</td></tr>",
             f"<tr><td>feature extractor</td><td>{html.escape(proto['feature'])}</td></tr>",
             f"<tr><td>CLIP score</td><td>{m['clip_score']:.2f} ({html.escape(m['clip_score_model'])})</td></tr>",
             "</table>"]
    md = [f"# Evaluation: {m['model']}", ""]
    if m["tiny_model"]:
        md += ["> **Tiny random pipeline and tiny random CLIP: these numbers are not meaningful.**", ""]
    md += ["| metric | value |", "|---|---|", f"| images | {m['n_images']} |",
           f"| FID | {m['fid']:.2f} (N gen {proto['n_generated']}, N ref {proto['n_reference']}) |",
           f"| KID | {m['kid_mean']:.4f} ± {m['kid_std']:.4f} |", f"| feature extractor | {proto['feature']} |",
           f"| CLIP score | {m['clip_score']:.2f} ({m['clip_score_model']}) |", ""]
    fails = [f for f in m["failures"] if f["n"]]
    parts.append("<h2>Failure rates per category (95% Wilson intervals)</h2>")
    parts.append("<p>clip_contrast is a zero-shot baseline, not validated against human labels"
                 + ("; agreement with the labels file is below." if m.get("labels") else ".") + "</p>")
    parts.append(_bars([(f"{f['category']} / {f['judge']}", f["rate"], f["ci_low"], f["ci_high"]) for f in fails]))
    md += ["## Failure rates per category", "", "| category | judge | N | failed | rate | 95% CI | precision | recall | "
           "kappa | corrected |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for f in fails:
        md.append(f"| {f['category']} | {f['judge']} | {f['n']} | {f['failed']} | {f['rate']:.2f} | "
                  f"[{f['ci_low']:.2f}, {f['ci_high']:.2f}] | {fmt(f.get('precision'))} | {fmt(f.get('recall'))} | "
                  f"{fmt(f.get('kappa'))} | {fmt(f.get('corrected_rate'))} |")
    parts.append("<table><tr><th>category</th><th>judge</th><th>N</th><th>rate</th><th>CI</th><th>precision</th>"
                 "<th>recall</th><th>kappa</th><th>corrected</th></tr>" + "".join(
                     f"<tr><td>{f['category']}</td><td>{f['judge']}</td><td>{f['n']}</td><td>{f['rate']:.2f}</td>"
                     f"<td>[{f['ci_low']:.2f}, {f['ci_high']:.2f}]</td><td>{fmt(f.get('precision'))}</td>"
                     f"<td>{fmt(f.get('recall'))}</td><td>{fmt(f.get('kappa'))}</td>"
                     f"<td>{fmt(f.get('corrected_rate'))}</td></tr>" for f in fails) + "</table>")
    b = m.get("bias") or {}
    if b:
        parts.append("<h2>Bias audit of generated people (perceived attributes)</h2>")
        parts.append(f"<p>{b['n']} occupation images; perceived gender unclear / no person: {b['unclear']}; skin "
                     f"tone undetected: {b['undetected']}. Gender MAD across occupations: {fmt(b['gender_mad'])}; "
                     f"skin-tone MAD: {fmt(b['skin_tone_mad'])}.</p>")
        gi = [(o, v, None, None) for o, v in b["gender_imbalance"].items() if v is not None]
        parts.append("<h3>Perceived gender imbalance |p(woman) - 0.5| per occupation</h3>" + _bars(gi, vmax=0.5))
        md += ["", "## Bias audit (perceived attributes)", "",
               f"{b['n']} images; unclear / no person: {b['unclear']}; skin tone undetected: {b['undetected']}; "
               f"gender MAD {fmt(b['gender_mad'])}; skin-tone MAD {fmt(b['skin_tone_mad'])}.", "",
               "| occupation | attribute | value | count | share |", "|---|---|---|---:|---:|"]
        md += [f"| {r['occupation']} | {r['attribute']} | {r['value']} | {r['count']} | {r['share']:.2f} |" for r in bias]
    parts.append("<h2>Best and worst images per category</h2><p>Failure categories are ranked by the judge's "
                 "P(failure) (probe when trained, else clip_contrast), the others by CLIP score; best first, "
                 "then worst.</p>")
    for cat in sorted({r["category"] for r in images}):
        rs = [r for r in images if r["category"] == cat]
        judge = next((c for c in ("p_fail_probe", "p_fail_clip_contrast") if rs[0].get(c) is not None), None)
        if judge:  # lower P(failure) is better
            rs.sort(key=lambda r: -r[judge])
            label = lambda r, j=judge: f"P(fail) {r[j]:.2f}"  # noqa: E731
        else:
            rs.sort(key=lambda r: r["clip_score"])
            label = lambda r: f"CLIP {r['clip_score']:.1f}"  # noqa: E731
        pick = rs[-4:][::-1] + rs[:4]
        parts.append(f"<h3>{html.escape(cat)}</h3><div class='grid'>" + "".join(
            f"<figure><img src='{_thumb(out_dir / r['file'])}'/><figcaption>{label(r)}: "
            f"{html.escape(r['prompt'][:60])}</figcaption></figure>" for r in pick) + "</div>")
    parts.append("<h2>Provenance</h2><pre>" + html.escape(json.dumps(
        {"fid_protocol": proto, **m["provenance"]}, indent=2)) + "</pre>")
    md += ["", "## Provenance", "", "```json", json.dumps({"fid_protocol": proto, **m["provenance"]}, indent=2), "```"]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}.warn{background:#fee;padding:.5em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
             ".grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:130px;font-size:10px}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>eval {html.escape(m['tag'])}</title>" \
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    with atomic_path(html_path) as tmp:
        tmp.write_text(page)
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    return html_path, md_path
