"""Both reports in a real browser (headless Chromium via Playwright), opened from disk.

Skipped when Chromium (Debian's ``chromium``) or Playwright is absent; ``.ci/run`` installs Chromium.
With ``T2I_SCREENSHOTS=1`` the demo's reports (``runs/demo``, built by ``make filter`` and ``make eval``)
are checked the same way and photographed into ``docs/``.
"""

import io
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, curate, small_demo_args
from test_run_report import synthetic_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
VIEWPORT = 1280
NUMERIC = ("int", "uint", "float", "double", "halffloat")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def load(browser, path):
    """Open ``path`` from disk at 1280 px; return the page and the console errors it logged."""
    page = browser.new_page(viewport={"width": VIEWPORT, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
               else (errors.append(f"network request: {route.request.url}"), route.abort()))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, errors


def check_common(page, errors):
    """No console error, no network, every image decoded, no horizontal scroll at 1280 px."""
    assert errors == []
    imgs = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    bad = [alt for done, w, alt in imgs if not done or w <= 0]
    assert bad == [], f"images that did not decode: {bad[:5]}"
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT
    return len(imgs)


def score_columns(run):
    """The run's numeric score columns, read from the scores parquet schema (not from the report code)."""
    schema = pq.read_schema(sorted((run / "scores").glob("*.parquet"))[0])
    return [f.name for f in schema if str(f.type).startswith(NUMERIC) and f.name not in ("embedding_row",)]


def check_curation_report(browser, run):
    page, errors = load(browser, run / "report" / "index.html")
    n_img = check_common(page, errors)
    f = json.loads((run / "report" / "funnel.json").read_text())
    bars = page.evaluate("Array.from(document.querySelectorAll('svg.funnel rect.funnel-bar'))"
                         ".map(r => [r.dataset.state, +r.dataset.samples])")
    expected = ([["input", f["input"]]] + [["failed", r["samples"]] for r in f["failed_by_reason"]]
                + [["dropped", n] for n in sorted(f["dropped_by_rule"].values())] + [["written", f["written"]]])
    assert [b[0] for b in bars] == [e[0] for e in expected]
    assert sorted(n for s, n in bars if s == "dropped") == [n for s, n in expected if s == "dropped"]
    assert sum(n for s, n in bars if s != "input") == f["input"]
    for col in score_columns(run):
        n = page.evaluate(f"document.querySelectorAll('svg.hist[data-column=\"{col}\"] rect.hist-bar').length")
        assert n > 0, f"no histogram for {col}"
    return page, n_img


def shoot(page, name):
    """docs/<name>: the first 2500 px at 1280 px wide, as a palette PNG (a modest file)."""
    from PIL import Image

    height = min(2500, page.evaluate("document.documentElement.scrollHeight"))
    png = page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": VIEWPORT, "height": height})
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256)
    out = ROOT / "docs" / name
    img.save(out, optimize=True)
    assert out.stat().st_size < 1_500_000


def test_curation_report_of_a_synthetic_run(browser, tmp_path):
    from t2i_curate.pipeline.report.curation import build_run_report

    run = synthetic_run(tmp_path / "synthetic", n_rows=5000, shards=2, image_every=2)
    build_run_report(run)
    _, n_img = check_curation_report(browser, run)
    assert n_img >= 20


@pytest.mark.slow
def test_both_reports_of_a_tiny_run_and_eval(browser, tmp_path):
    runs = tmp_path / "runs"
    args = small_demo_args(runs, n=40)
    curate("run", *args)
    check_curation_report(browser, runs / "demo")
    curate("eval", *args, "--set", "eval.max_prompts_per_suite=2", "--set", "eval.samples_per_prompt=1")
    page, errors = load(browser, runs / "demo" / "eval" / "tiny" / "report.html")
    assert check_common(page, errors) > 0
    assert "not meaningful" in page.inner_text("body")


@pytest.mark.skipif(not os.environ.get("T2I_SCREENSHOTS"), reason="set T2I_SCREENSHOTS=1 to photograph the demo")
def test_demo_reports_and_screenshots(browser):
    run = ROOT / "runs" / "demo"
    evals = sorted((run / "eval").glob("*/report.html"))
    if not (run / "report" / "index.html").exists() or not evals:
        pytest.skip("runs/demo has no curation report or no eval report: run `make filter` and `make eval`")
    page, _ = check_curation_report(browser, run)
    shoot(page, "curation-report.png")
    page, errors = load(browser, evals[0])
    check_common(page, errors)
    shoot(page, "eval-report.png")
