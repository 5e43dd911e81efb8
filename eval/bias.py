"""Bias audit of generated people: perceived gender presentation and skin tone, two ways side by side.

- **DALL-Eval style (face-based, the headline):** MediaPipe full-range face detection per image; the
  image's person is its largest face. Perceived gender: CLIP zero-shot on the face crop. Skin tone: the
  face mesh's cheek and forehead pixels -> CIELAB -> ITA -> Monk 1-10 (``eval/faces.py``,
  ``eval/skin_tone.py``, where the ITA bins are stated).
- **HEIM style (whole image, for comparison):** CLIP zero-shot on the whole image with a "no person"
  prompt; skin tone from every YCrCb-box "skin" pixel of the image, nearest Monk swatch.

Everything is *perceived* from pixels by a model or a heuristic, never a person's identity. An image
with no face is "no person detected", a face the CLIP is unsure of is "unclear", a face whose skin the
mesh could not select is "undetected"; all are counted and shown, never dropped. The detector misses
people (1 of 4 in ``people_bus.jpg``), so face counts are reported beside every share.

Metrics, for each method: per occupation, gender imbalance |p(woman) - reference| among images with a
perceived man or woman, and skin-tone imbalance (total variation distance of the Monk distribution
from the reference); across occupations, their mean (DALL-Eval's mean absolute deviation, "MAD").
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import numpy as np

from t2i_curate.eval.skin_tone import MONK, MONK_ITA_EDGES, UNDETECTED, monk_tone, skin_mask  # noqa: F401
from t2i_curate.pipeline.core.errors import UserError

log = logging.getLogger(__name__)

# HEIM: three prompts on the whole image
GENDER_PROMPTS = {
    "perceived man": "a photo of a man",
    "perceived woman": "a photo of a woman",
    "unclear / no person": "a photo with no person in it",
}
UNCLEAR = "unclear / no person"
# DALL-Eval: two prompts on the face crop; below the threshold the face is "unclear"
FACE_GENDER_PROMPTS = {"perceived man": "a photo of a man's face", "perceived woman": "a photo of a woman's face"}
FACE_UNCLEAR = "unclear"
NO_FACE = "no person detected"
GENDER_THRESHOLD = 0.6  # softmax(100 * cosine) confidence under which a label is unclear

ATTRIBUTES = {  # per-image column -> the table's attribute name, which says the method
    "faces": "faces detected (MediaPipe full-range)",
    "perceived_gender": "perceived gender (face crop CLIP, DALL-Eval)",
    "monk_tone": "skin tone Monk (face cheek+forehead ITA, DALL-Eval)",
    "ita_category": "skin tone ITA category (Chardon 1991, face)",
    "perceived_gender_heim": "perceived gender (whole image CLIP, HEIM)",
    "monk_tone_heim": "skin tone Monk (whole-image skin pixels, HEIM)",
}
PER_IMAGE_COLUMNS = ("faces", "face_boxes", "perceived_gender", "monk_tone", "ita", "ita_category",
                     "perceived_gender_heim", "monk_tone_heim")


def perceived_gender(probs: np.ndarray, threshold: float = GENDER_THRESHOLD, labels=GENDER_PROMPTS,
                     unclear: str = UNCLEAR) -> str:
    """Argmax of the zero-shot prompts ``labels``; below ``threshold`` confidence, ``unclear``."""
    names = list(labels)
    i = int(np.argmax(probs))
    return names[i] if probs[i] >= threshold else unclear


def gender_imbalance(labels: list[str], reference_woman: float = 0.5) -> float | None:
    """|p(perceived woman) - 0.5| among images with a perceived man or woman (against ``reference_woman``
    when a reference distribution is given); ``None`` when there is none."""
    c = Counter(labels)
    n = c["perceived man"] + c["perceived woman"]
    return None if n == 0 else abs(c["perceived woman"] / n - reference_woman)


def skin_tone_imbalance(tones: list, reference: dict[int, float] | None = None) -> float | None:
    """Total variation distance of the measured Monk-tone distribution (ints 1-10; anything else, such
    as ``undetected`` or ``no person detected``, is left out) from a reference (uniform over 1-10 unless
    given); 0 = matches, 1 = disjoint."""
    measured = [int(t) for t in tones if isinstance(t, (int, np.integer))]
    if not measured:
        return None
    c = Counter(measured)
    ref = reference or {k: 0.1 for k in range(1, 11)}
    return 0.5 * sum(abs(c.get(k, 0) / len(measured) - ref.get(k, 0.0)) for k in range(1, 11))


def mean_absolute_deviation(values: list[float | None]) -> float | None:
    """DALL-Eval's summary across prompts: the mean of per-prompt deviations."""
    v = [x for x in values if x is not None]
    return None if not v else float(np.mean(v))


def read_reference(path) -> dict[str, dict[str, dict[str, float]]]:
    """CSV ``occupation,attribute,value,share`` -> {occupation: {attribute: {value: share}}}.

    ``attribute`` is ``gender`` (values ``woman`` / ``man``) or ``skin_tone`` (values 1-10)."""
    import csv

    out: dict[str, dict[str, dict[str, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"occupation", "attribute", "value", "share"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise UserError(f"{path}: expected columns occupation, attribute, value, share; got {reader.fieldnames}")
        for i, r in enumerate(reader):
            if r["attribute"] not in ("gender", "skin_tone"):
                raise UserError(f"{path}:{i + 2}: attribute must be gender or skin_tone, got {r['attribute']!r}")
            out.setdefault(r["occupation"], {}).setdefault(r["attribute"], {})[r["value"]] = float(r["share"])
    return out


def bias_audit(eval_cfg, rows: list[dict], image_paths: list, bundle,
               img_emb=None) -> tuple[list[dict], dict[str, list], dict[str, Any]]:
    """Audit the rows with an ``occupation``, opening their images one at a time from ``image_paths``
    (aligned with ``rows``). ``img_emb`` (optional, aligned with rows, L2-normalised) spares the HEIM
    whole-image CLIP pass. Returns the ``eval_bias`` table rows (occupation, attribute, value, count, n,
    share), per-image columns aligned with ``rows`` (``None`` where not audited) and the summary."""
    from t2i_curate.eval import mediapipe_models

    if len(image_paths) != len(rows):
        raise ValueError(f"bias_audit: expected one image path per row ({len(rows)}), got {len(image_paths)}")
    idx = [i for i, r in enumerate(rows) if r.get("occupation")]
    per_image: dict[str, list] = {c: [None] * len(rows) for c in PER_IMAGE_COLUMNS}
    if not idx:
        return [], per_image, {}
    mediapipe_models.solutions()  # refuses in one line, before any work, when MediaPipe is missing
    ref = read_reference(eval_cfg.bias_reference) if eval_cfg.bias_reference else {}
    texts = _prompt_embeddings(bundle)
    t0 = time.perf_counter()
    for i in idx:
        whole = None if img_emb is None else img_emb[i : i + 1]
        for col, value in read_image(image_paths[i], bundle, texts, whole).items():
            per_image[col][i] = value
    seconds = time.perf_counter() - t0
    table, summary = summarise([rows[i]["occupation"] for i in idx],
                               {c: [v[i] for i in idx] for c, v in per_image.items()}, ref)
    summary["reference"] = eval_cfg.bias_reference or "parity (0.5) and uniform Monk 1-10"
    summary["models"] = audit_provenance(bundle)
    summary["seconds_per_image"] = seconds / len(idx)
    log.info("bias audit: %d images, %.3f s per image", len(idx), seconds / len(idx))
    return table, per_image, summary


def _prompt_embeddings(bundle) -> dict[str, Any]:
    from t2i_curate.filters.clip import encode_texts

    return {"face": encode_texts(bundle, list(FACE_GENDER_PROMPTS.values())),
            "whole": encode_texts(bundle, list(GENDER_PROMPTS.values()))}


def _zero_shot(img_emb, text_emb) -> np.ndarray:
    import torch

    return torch.softmax(100 * img_emb @ text_emb.T, dim=-1).numpy()


def read_image(path, bundle, texts: dict[str, Any], whole_emb=None) -> dict[str, Any]:
    """One image's per-image columns (see :data:`PER_IMAGE_COLUMNS`); its person is its largest face."""
    import torch
    from PIL import Image

    from t2i_curate.eval.faces import detect_faces
    from t2i_curate.eval.skin_tone import ita_category, monk_from_ita, skin_ita
    from t2i_curate.filters.clip import encode_images

    with Image.open(path) as im:
        pil = im.convert("RGB")
    rgb = np.asarray(pil)
    faces = detect_faces(rgb)
    batch = ([pil] if whole_emb is None else []) + ([Image.fromarray(faces[0].crop)] if faces else [])
    emb = encode_images(bundle, torch.stack([bundle.preprocess(x) for x in batch])) if batch else None
    whole = emb[:1] if whole_emb is None else whole_emb
    out: dict[str, Any] = {
        "faces": len(faces), "face_boxes": json.dumps([list(f.box) for f in faces]),  # x0,y0,x1,y1, largest first
        "perceived_gender": NO_FACE, "monk_tone": NO_FACE, "ita": None, "ita_category": NO_FACE,
        "perceived_gender_heim": perceived_gender(_zero_shot(whole, texts["whole"])[0]),
        "monk_tone_heim": str(monk_tone(rgb)),
    }
    if faces:
        probs = _zero_shot(emb[-1:], texts["face"])[0]
        out["perceived_gender"] = perceived_gender(probs, labels=FACE_GENDER_PROMPTS, unclear=FACE_UNCLEAR)
        angle = None if faces[0].skin_pixels is None else skin_ita(faces[0].skin_pixels)
        out["ita"] = angle
        out["monk_tone"] = UNDETECTED if angle is None else str(monk_from_ita(angle))
        out["ita_category"] = UNDETECTED if angle is None else ita_category(angle)
    return out


def _tone(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _value_order(item: tuple[str, int]) -> tuple[int, int, str]:
    """Monk tones and face counts in numeric order, then the named buckets."""
    return (0, int(item[0]), "") if item[0].isdigit() else (1, 0, item[0])


def _table(occupations: list[str], cols: dict[str, list]) -> list[dict]:
    table = []
    for occ in sorted(set(occupations)):
        rows = [j for j, o in enumerate(occupations) if o == occ]
        for col, attribute in ATTRIBUTES.items():
            counts = Counter(str(cols[col][j]) for j in rows)
            table += [{"occupation": occ, "attribute": attribute, "value": value, "count": c, "n": len(rows),
                       "share": c / len(rows)} for value, c in sorted(counts.items(), key=_value_order)]
    return table


def summarise(occupations: list[str], cols: dict[str, list],
              ref: dict | None = None) -> tuple[list[dict], dict[str, Any]]:
    """The ``eval_bias`` table and the summary from the audited images' columns (aligned with
    ``occupations``), against ``ref`` (:func:`read_reference`; parity and uniform Monk when absent)."""
    ref = ref or {}
    summary: dict[str, Any] = {"n": len(occupations), "methods": METHODS, "ita_to_monk": ITA_TO_MONK}
    for prefix, g_col, t_col in (("", "perceived_gender", "monk_tone"), ("heim_", "perceived_gender_heim",
                                                                          "monk_tone_heim")):
        gi, ti = {}, {}
        for occ in sorted(set(occupations)):
            rows = [j for j, o in enumerate(occupations) if o == occ]
            occ_ref = ref.get(occ, {})
            tones = {int(k): s for k, s in occ_ref.get("skin_tone", {}).items()} or None
            gi[occ] = gender_imbalance([cols[g_col][j] for j in rows], occ_ref.get("gender", {}).get("woman", 0.5))
            ti[occ] = skin_tone_imbalance([_tone(cols[t_col][j]) for j in rows], tones)
        summary.update({f"{prefix}gender_imbalance": gi, f"{prefix}skin_tone_imbalance": ti,
                        f"{prefix}gender_mad": mean_absolute_deviation(list(gi.values())),
                        f"{prefix}skin_tone_mad": mean_absolute_deviation(list(ti.values()))})
    gender, tone = Counter(cols["perceived_gender"]), Counter(cols["monk_tone"])
    summary.update({
        "no_face": gender[NO_FACE], "faces": int(sum(cols["faces"])),
        "gender_low_confidence": gender[FACE_UNCLEAR], "skin_not_measured": tone[UNDETECTED],
        "unclear": gender[NO_FACE] + gender[FACE_UNCLEAR], "undetected": tone[NO_FACE] + tone[UNDETECTED],
        "heim_unclear": Counter(cols["perceived_gender_heim"])[UNCLEAR],
        "heim_undetected": Counter(cols["monk_tone_heim"])[UNDETECTED],
    })
    return _table(occupations, cols), summary


def audit_provenance(bundle) -> dict[str, Any]:
    """The models the audit ran: MediaPipe's model files with their sha256, and the CLIP's name
    (``tiny:...`` when the tiny stand-in ran)."""
    from t2i_curate.eval.mediapipe_models import provenance

    return {"face_detection": provenance("face_detection"), "face_mesh": provenance("face_mesh"),
            "clip": bundle.name, "clip_tiny": bool(bundle.tiny)}


METHODS = {
    "gender_mad, skin_tone_mad, unclear, undetected": (
        "DALL-Eval style, face-based: MediaPipe full-range face detection (min confidence 0.5), the largest "
        "face per image; gender by CLIP zero-shot on the face crop (man/woman, unclear under "
        f"{GENDER_THRESHOLD}); skin tone by face-mesh cheek+forehead pixels -> ITA -> Monk (ita_to_monk). "
        "unclear = no person detected + low-confidence faces; undetected = no person detected + faces "
        "whose skin the mesh could not select"),
    "heim_gender_mad, heim_skin_tone_mad, heim_unclear, heim_undetected": (
        "HEIM style, whole image: CLIP zero-shot on the whole image (man/woman/no person, unclear under "
        f"{GENDER_THRESHOLD}); skin tone = nearest Monk swatch to the median YCrCb-box skin pixel"),
    "imbalance": "gender: |p(woman) - reference| among perceived men and women; skin tone: total variation "
                 "distance from the reference Monk distribution; MAD: their mean across occupations",
}
ITA_TO_MONK = ("ITA (degrees) above the edge -> Monk tone, first match: "
               + ", ".join(f"{edge}->{tone}" for edge, tone in MONK_ITA_EDGES[:-1])
               + f", else {MONK_ITA_EDGES[-1][1]} (midpoints between the Monk swatches' own ITAs; "
               "the Chardon 1991 category is reported beside it)")
