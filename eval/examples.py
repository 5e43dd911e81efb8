"""What the judges saw, kept for people to check by eye, and the per-image census of people.

- :func:`save_examples`: after a judge that keeps MediaPipe observations (``last_observations``) has
  judged a category, a few of its failed, passed and unknown images are saved with the hands, pose and
  face boxes it found drawn on them (``examples/<judge>/<category>/<image_id>.png``); the report shows them.
- :func:`census`: faces, hands and people found in every image (MediaPipe's full-range face detector and
  hand model), the ``eval_judgements`` count columns; skipped, and said so, when MediaPipe is absent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
PER_VERDICT = 3  # examples kept per judge, category and verdict


def save_examples(judge, category: str, idx: list[int], rows: list[dict], columns: dict[str, list],
                  out_dir: Path) -> list[dict[str, Any]]:
    """Draw up to :data:`PER_VERDICT` failed, passed and unknown images of ``category`` for ``judge``."""
    from PIL import Image

    from t2i_curate.eval.draw import draw_observation

    observed = getattr(judge, "last_observations", None)
    if not observed or len(observed) != len(idx):
        return []
    picked: dict[str, int] = {}
    out = []
    for j, i in enumerate(idx):
        verdict = columns[f"verdict_{judge.name}"][i]
        obs = observed[j]
        if obs is None or picked.get(verdict, 0) >= PER_VERDICT:
            continue
        picked[verdict] = picked.get(verdict, 0) + 1
        rel = Path("examples") / judge.name / category / f"{rows[i]['image_id']}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(out_dir / rows[i]["file"]) as im:
            draw_observation(im.convert("RGB"), obs).save(out_dir / rel)
        out.append({"judge": judge.name, "category": category, "image_id": rows[i]["image_id"],
                    "verdict": verdict, "p_fail": columns[f"p_fail_{judge.name}"][i], "file": rel.as_posix(),
                    "prompt": rows[i]["prompt"]})
    return out


def census(rows: list[dict], paths: list[Path]) -> tuple[dict[str, list], dict[str, Any]]:
    """Per image: ``faces``, ``hands`` and ``people`` (a face scoring >= 0.5: the person gate) found, with
    the models that found them; all None (and ``ran: false`` with the reason) without MediaPipe."""
    from tqdm import tqdm

    from t2i_curate.eval import mediapipe_models
    from t2i_curate.eval.vision import mediapipe_provenance, observe_path

    cols: dict[str, list] = {"faces": [None] * len(rows), "hands": [None] * len(rows), "people": [None] * len(rows)}
    if not mediapipe_models.available():
        log.warning("census of faces and hands skipped: MediaPipe is not installed (%s)", mediapipe_models.INSTALL)
        return cols, {"ran": False, "reason": f"MediaPipe not installed: {mediapipe_models.INSTALL}"}
    for i, path in enumerate(tqdm(paths, desc="census (faces, hands)", unit="img", leave=False)):
        try:
            obs = observe_path(path, pose=False)  # what the hands judge saw, when it looked already
        except (OSError, ValueError) as e:
            log.warning("census: cannot read %s (%s)", path, e)
            continue
        cols["faces"][i], cols["hands"][i] = len(obs.faces), len(obs.hands)
        cols["people"][i] = sum(f.score >= 0.5 for f in obs.faces)
    return cols, {"ran": True, "models": mediapipe_provenance("face_detection", "hands"),
                  "definition": "faces: full-range face detections; people: those scoring >= 0.5 (a lower "
                                "bound: the detector misses small and turned faces); hands: MediaPipe Hands"}
