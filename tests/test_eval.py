"""Evaluation: every metric against an independent implementation, sampler determinism, judges, e2e."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from t2i_curate.eval import bias as B  # noqa: N812
from t2i_curate.eval.fid import ProtocolMismatchError, check_comparable
from t2i_curate.eval.judge import LabelsError, read_labels
from t2i_curate.eval.judge_probe import ProbeJudge
from t2i_curate.eval.judge_vqa import CONFIG_KEY, VQA_QUESTIONS, VQAJudge, parse_yes_no
from t2i_curate.eval.stats import agreement, clip_score, corrected_rate, wilson
from t2i_curate.pipeline.core.errors import UserError


class FixedFeatures(torch.nn.Module):
    """A deterministic feature extractor: mean colour and a few pixel statistics of uint8 images."""

    num_features = 6

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def _frechet(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _mmd_poly(f1, f2, degree=3, coef=1.0):
    d = f1.shape[1]
    k = lambda a, b: (a @ b.T / d + coef) ** degree  # noqa: E731
    m, n = len(f1), len(f2)
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def _images(seed, n, shift):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, 3, 1, 1), generator=g) + shift
    noise = torch.randint(0, 55, (n, 3, 32, 32), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def test_fid_matches_scipy_frechet():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _images(0, 64, 0), _images(1, 48, 30)
    fid = FrechetInceptionDistance(feature=FixedFeatures())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    f = FixedFeatures()
    ref = _frechet(f(real).double().numpy(), f(fake).double().numpy())
    assert float(fid.compute()) == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_kid_matches_explicit_polynomial_mmd():
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _images(2, 40, 0), _images(3, 40, 20)
    kid = KernelInceptionDistance(feature=FixedFeatures(), subsets=1, subset_size=40)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    mean, _ = kid.compute()
    f = FixedFeatures()
    ref = _mmd_poly(f(real).double().numpy(), f(fake).double().numpy())
    # KID keeps the float32 features (FID casts to float64): kernel sums round with the thread count
    assert float(mean) == pytest.approx(ref, rel=1e-3, abs=1e-6)


def test_clip_score_formula():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [3.0, 4.0]])
    assert clip_score(img, txt).tolist() == pytest.approx([100 / 2**0.5, 0.0, 100.0])


def test_wilson_known_values():
    # Wilson 95% for 5/10 and 0/20 (reference values from the closed form)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_agreement_kappa_and_correction():
    truth = [True, True, True, False, False, False, False, False]
    pred = [True, True, False, True, False, False, False, False]
    a = agreement(truth, pred)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    # po = 6/8; pe = (3*3 + 5*5)/64
    assert a["kappa"] == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64))
    assert corrected_rate(0.3, 0.8, 0.9) == pytest.approx((0.3 + 0.9 - 1) / 0.7)
    assert corrected_rate(0.3, 0.5, 0.5) is None


def test_protocols_must_match():
    a = {"library": "torchmetrics", "torchmetrics": "1.9.0", "feature": "clip:ViT-L-14/openai", "resize": "x",
         "n_reference": 10}
    check_comparable(a, {**a, "n_reference": 20})
    with pytest.raises(ProtocolMismatchError, match="feature"):
        check_comparable(a, {**a, "feature": "inception-v3"})


def test_probe_recovers_separable_labels():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(80, 16, generator=g)
    labels = (emb[:, 0] > 0).tolist()
    oof = ProbeJudge.cross_validated(emb, labels)
    acc = np.mean([(p > 0.5) == y for p, y in zip(oof, labels, strict=True)])
    assert acc >= 0.9
    assert agreement(labels, [p > 0.5 for p in oof])["kappa"] > 0.8


def test_vqa_judge_interface():
    """The VQA judge needs a model from config and reads answers strictly; tests/test_judge_vqa.py runs it
    on a tiny model."""
    assert "malformed hands" in VQA_QUESTIONS["human_limbs"]  # the questions ask about a failure: yes = failed
    assert [parse_yes_no(a) for a in ("Yes, six fingers", "no", "unsure", "")] == [True, False, None, None]
    with pytest.raises(UserError, match=CONFIG_KEY):
        VQAJudge()


def test_labels_file_errors(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("image_id,category,failed\na_0,human_limbs,yes\nb_0,horses,No\n")
    assert read_labels(p) == {"a_0": True, "b_0": False}
    p.write_text("image_id,category,failed\na_0,human_limbs,maybe\n")
    with pytest.raises(LabelsError, match="yes/no"):
        read_labels(p)


def test_bias_metrics():
    assert B.gender_imbalance(["perceived woman"] * 3 + ["perceived man"] + [B.UNCLEAR] * 5) == pytest.approx(0.25)
    assert B.gender_imbalance([B.UNCLEAR]) is None
    assert B.skin_tone_imbalance(list(range(1, 11))) == pytest.approx(0.0)
    assert B.skin_tone_imbalance([3, 3, B.UNDETECTED]) == pytest.approx(0.9)
    # a patch painted with Monk swatch 2 and one with swatch 8 land on those tones; grey is undetected
    for tone in (2, 8):
        rgb = np.array([int(B.MONK[tone - 1][i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
        patch = np.tile(rgb, (32, 32, 1))
        if B.skin_mask(patch).mean() > 0.5:
            assert B.monk_tone(patch) == tone
    assert B.monk_tone(np.full((32, 32, 3), 128, np.uint8)) == B.UNDETECTED
    assert B.perceived_gender(np.array([0.4, 0.35, 0.25])) == B.UNCLEAR


def test_sampler_is_independent_of_batch_size(tmp_path):
    from t2i_curate.eval.sampler import sample
    from t2i_curate.pipeline.core.config import EvalConfig

    prompts = [{"id": "p0", "category": "general", "prompt": "a red cube"},
               {"id": "p1", "category": "general", "prompt": "a horse"}]
    from PIL import Image

    outs = []
    for bs in (1, 3):
        cfg = EvalConfig(height=32, width=32, steps=2, samples_per_prompt=2, batch_size=bs)
        meta = sample(cfg, prompts, tmp_path / f"b{bs}")
        outs.append({r: np.asarray(Image.open(tmp_path / f"b{bs}" / "images" / f"{r}.png")).astype(int)
                     for r in ("p0_0", "p0_1", "p1_0", "p1_1")})
        assert meta.exists()
    for k in outs[0]:
        # same generator per image: equal up to one 8-bit level (float rounding in batched kernels)
        assert np.abs(outs[0][k] - outs[1][k]).max() <= 1
    assert np.abs(outs[0]["p0_0"] - outs[0]["p0_1"]).max() > 50  # different seeds per sample index


def test_suite_loaders_on_public_files(shared):
    from t2i_curate.eval.suites import load_suite

    parti = load_suite(str(shared / "prompts" / "PartiPrompts.tsv"))
    assert len(parti) == 1632 and {"id", "category", "prompt", "challenge"} <= set(parti[0])
    gen = load_suite(str(shared / "prompts" / "geneval_evaluation_metadata.jsonl"))
    assert len(gen) == 553 and gen[0]["category"] == "single_object"


def test_drawbench_and_builtin_suites(tmp_path):
    from t2i_curate.eval.suites import SuiteError, load_suite, load_suites

    p = tmp_path / "drawbench.csv"
    p.write_text('Prompts,Category\n"A red colored car.",Colors\n"A horse on a bench",Positional\n')
    rows = load_suite(str(p))
    assert [r["category"] for r in rows] == ["colors", "positional"]
    occ = load_suite("occupations")
    assert len({r["occupation"] for r in occ}) >= 20
    assert all(r["prompt"].startswith("a photo of the face of a") for r in occ)
    with pytest.raises(SuiteError, match="built-in suite"):
        load_suites(["nope"])


def test_eval_end_to_end_and_report_rebuild(tmp_path):
    """`curate eval` on a small curated run: report, metrics, catalog tables; report rebuilt from files."""
    import duckdb
    from conftest import curate, small_demo_args

    runs = tmp_path / "runs"
    curate("run", *small_demo_args(runs, n=40))
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,category,failed\n" + "".join(
        f"people-{i:03d}_{j},human_limbs,{'yes' if i % 2 else 'no'}\n" for i in range(6) for j in range(2)))
    args = [*small_demo_args(runs, n=40), "--set", "eval.max_prompts_per_suite=6", "--set", f"eval.labels={labels}"]
    curate("eval", *args)
    out = runs / "demo" / "eval" / "tiny"
    m = json.loads((out / "metrics.json").read_text())
    assert m["tiny_model"] is True and m["fid_protocol"]["feature"].startswith("clip:tiny:")
    assert m["n_images"] == 4 * 6 * 2
    judges = {(f["category"], f["judge"]) for f in m["failures"]}
    assert ("human_limbs", "clip_contrast") in judges and ("human_limbs", "probe") in judges
    limbs = next(f for f in m["failures"] if f["category"] == "human_limbs" and f["judge"] == "clip_contrast")
    assert limbs["n_labelled"] == 12 and "kappa" in limbs
    html = (out / "report.html").read_text()
    assert "not meaningful" in html and "data:image/png;base64," in html and "Wilson" in html
    assert m["fid_protocol"]["protocol"] == "torch-fidelity" and "torch-fidelity" in html
    assert "CLIPScore paper corpus score (per-image clamp, then mean)" in html and "torchmetrics" in html
    assert m["clip_score_torchmetrics"] <= m["clip_score"] + 1e-9
    (out / "report.html").unlink()
    curate("report", *args)
    assert (out / "report.html").exists()
    curate("compare", out, out)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**m, "fid_protocol": {**m["fid_protocol"], "feature": "inception-v3"}}))
    r = curate("compare", out, other, check=False)
    assert r.returncode == 2 and "not comparable" in r.stderr
    con = duckdb.connect(str(runs / "demo" / "catalog.duckdb"), read_only=True)
    for t in ("eval_images", "eval_metrics", "eval_failures", "eval_bias"):
        assert con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] > 0
    # a rerun samples nothing new and reuses the cached reference statistics
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    curate("eval", *args)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before
    assert len(list((runs / "demo" / "eval" / "_reference").glob("reference-*.pt"))) == 1


def test_bias_reference_file(tmp_path):
    p = tmp_path / "ref.csv"
    p.write_text("occupation,attribute,value,share\nnurse,gender,woman,0.87\nnurse,skin_tone,3,1.0\n")
    ref = B.read_reference(p)
    assert ref["nurse"]["gender"]["woman"] == 0.87
    assert B.gender_imbalance(["perceived woman"] * 9 + ["perceived man"], 0.87) == pytest.approx(0.03)
    assert B.skin_tone_imbalance([3, 3], {3: 1.0}) == pytest.approx(0.0)
    p.write_text("occupation,attribute,value,share\nnurse,age,old,1\n")
    with pytest.raises(UserError, match="gender or skin_tone"):
        B.read_reference(p)


def test_clip_users_follow_the_models_device_and_dtype():
    """measure puts the eval CLIP on CUDA in fp16; encode_* move every input to where the model is, so the
    judges, the bias audit and coverage never hand it CPU fp32 tensors (fp16 on the CPU stands in)."""
    import torch

    from t2i_curate.eval.judge_clip_contrast import ClipContrastJudge
    from t2i_curate.filters.clip import encode_images, encode_texts, tiny_clip

    b = tiny_clip("ViT-L-14/openai")
    b.model.half()
    img = encode_images(b, torch.rand(2, 3, 224, 224))
    txt = encode_texts(b, ["a horse", "a cat"])
    assert img.dtype == txt.dtype == torch.float32 and img.device.type == txt.device.type == "cpu"
    p = ClipContrastJudge(bundle=b).p_fail_embeddings(img, "horses")
    assert p.shape == (2,) and bool(((p >= 0) & (p <= 1)).all())
