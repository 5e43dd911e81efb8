"""`curate verify RUN`: check every shard of every stage against its parquet and the manifest.

Returns a list of problems (empty when the run is sound): sample counts and
keys of each tar against its parquet, each curated shard's sha256 against
``manifest.json``, duplicate keys across shards, scores for every download
success, download results + refused URLs = input, every ``duplicate_of`` pointing at a
selected sample, and the accounting identity written + dropped + failed = input.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from t2i_curate.pipeline.core.errors import StageIncomplete
from t2i_curate.pipeline.core.io import (
    parquet_file,
    read_metadata,
    sha256_file,
    shard_ids,
)
from t2i_curate.pipeline.core.layout import RunLayout, shard_name, shard_of_key
from t2i_curate.pipeline.core.tars import IMAGE_SHA256, image_sha256, iter_members


class VerifyError(StageIncomplete):
    """The run has problems; the message lists every one."""


def check_run(run_dir: Path) -> int:
    """Raise :class:`VerifyError` listing every problem; return the number of checks passed."""
    problems = verify_run(run_dir)
    if problems:
        raise VerifyError(f"verify {run_dir}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))
    return 0


def _tar_keys(path: Path, problems: list[str], hashes: dict[str, str] | None = None) -> Counter:
    """Samples (image members) per key; a damaged tar is a problem. ``hashes``: filled with each image's
    sha256 (the download tars, checked against the bytes the score stage read)."""
    errors: list[str] = []
    keys: Counter = Counter()
    for key, _, data in iter_members(path, skip_exts=("json", "txt"), errors=errors):
        keys[key] += 1
        if hashes is not None:
            hashes[key] = image_sha256(data)
    problems += [f"{path}: unreadable tar: {e}" for e in errors]
    return keys


def _parquet_table(path: Path, problems: list[str], columns: list[str] | None = None):
    """The table (those of ``columns`` it has; its schema metadata kept), opened once; None, and a
    problem listed, when it cannot be read."""
    try:
        pf = parquet_file(path)
        if columns is not None:
            columns = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=columns)
    except Exception as e:  # any unreadable parquet is a problem to report, not a crash
        problems.append(f"{path}: unreadable parquet: {type(e).__name__}: {e}")
        return None


def _parquet_rows(path: Path, problems: list[str], columns: list[str] | None = None) -> list[dict]:
    table = _parquet_table(path, problems, columns)
    return [] if table is None else table.to_pylist()


def _verify_downloads(lay: RunLayout, problems: list[str], hashes: dict[str, str]) -> tuple[set[str], int]:
    """Each finished download tar against its parquet; returns the successful keys and the row count;
    fills ``hashes`` (key -> sha256 of the stored image)."""
    success: set[str] = set()
    n_rows = 0
    for s in lay.finished_downloads():
        rows = _parquet_rows(lay.download_parquet(s), problems, ["key", "status"])
        n_rows += len(rows)
        ok = {r["key"] for r in rows if r["status"] == "success"}
        success |= ok
        in_tar = _tar_keys(lay.download_tar(s), problems, hashes)
        if set(in_tar) != ok:
            problems.append(f"download/{shard_name(s)}: tar holds {len(in_tar)} images, parquet says {len(ok)} "
                            f"successes (missing {sorted(ok - set(in_tar))[:3]}, extra {sorted(set(in_tar) - ok)[:3]})")
        dup = [k for k, c in in_tar.items() if c > 1]
        if dup:
            problems.append(f"download/{shard_name(s)}: duplicate samples in the tar: {dup[:5]}")
    return success, n_rows


def _verify_scores(lay: RunLayout, problems: list[str], success: set[str], hashes: dict[str, str]) -> None:
    """Scores for every download success, and the download images still the bytes that were scored."""
    scored: set[str] = set()
    changed: list[str] = []
    for s in shard_ids(lay.scores, ".parquet"):
        for r in _parquet_rows(lay.score_parquet(s), problems, ["key", IMAGE_SHA256]):
            scored.add(r["key"])
            want, got = r.get(IMAGE_SHA256), hashes.get(r["key"])
            if want and got and want != got:
                changed.append(r["key"])
    if scored and success - scored:
        problems.append(f"scores: {len(success - scored)} downloaded samples have no scores")
    if changed:
        shards = sorted({shard_name(shard_of_key(k)) for k in changed})
        problems.append(f"download: {len(changed)} images differ from the bytes the score stage read "
                        f"(sha256), e.g. {changed[:3]} in download/{', '.join(shards[:5])}.tar; remove those "
                        f"download shards (tar, parquet, _stats.json) and run `curate run` to fetch them again")


def verify_run(run_dir: Path) -> list[str]:
    lay = RunLayout(run_dir)
    problems: list[str] = []
    hashes: dict[str, str] = {}
    success, n_download_rows = _verify_downloads(lay, problems, hashes)
    _verify_scores(lay, problems, success, hashes)
    manifest = _read_manifest(lay, problems)
    n_input = _check_input_rows(lay, n_download_rows, problems)
    selected = _check_decisions(lay, n_input, manifest, problems) if lay.decisions.exists() else None
    if manifest is not None:
        problems += _verify_selected(lay, manifest, problems)
    elif selected:
        problems.append(f"selected: {lay.manifest} is missing, but the selection chose {selected} samples; "
                        f"run `curate write`")
    elif shard_ids(lay.selected, ".tar") or shard_ids(lay.selected, ".parquet"):
        problems.append(f"selected: curated shards on disk but no {lay.manifest}; run `curate write`")
    if not (success or n_download_rows or lay.input_files()):
        problems.append(f"{run_dir}: nothing to verify (no input, no download shard): is this a run folder?")
    return problems


def _read_manifest(lay: RunLayout, problems: list[str]) -> dict | None:
    """The curated shards' manifest, or None when absent or unreadable (unreadable: a problem)."""
    if not lay.manifest.exists():
        return None
    try:
        manifest = json.loads(lay.manifest.read_text())
        if not (isinstance(manifest, dict) and isinstance(manifest.get("shards"), list)
                and all(isinstance(e, dict) and {"shard", "sha256", "samples"} <= set(e)
                        for e in manifest["shards"])):
            raise ValueError("expected an object whose 'shards' lists {shard, sha256, samples}")
        return manifest
    except (OSError, ValueError) as e:
        problems.append(f"{lay.manifest}: unreadable manifest ({type(e).__name__}: {e}); run `curate write`")
        return None


def _check_decisions(lay: RunLayout, n_input: int, manifest: dict | None, problems: list[str]) -> int:
    """The decisions table: one per input row and key, dedup pointers; returns the selected count."""
    dec = _parquet_rows(lay.decisions, problems, ["key", "state", "duplicate_of"])
    if dec and not {"key", "state"} <= set(dec[0]):
        problems.append(f"{lay.decisions}: not a decisions table (no key and state columns); run `curate select`")
        return 0
    if not dec:
        return 0
    states = Counter(d["state"] for d in dec)
    if len(dec) != n_input:
        problems.append(f"accounting: {len(dec)} decisions for {n_input} input rows")
    if len({d["key"] for d in dec}) != len(dec):
        problems.append("accounting: a key has more than one decision")
    selected = {d["key"] for d in dec if d["state"] == "selected"}
    orphans = [d["key"] for d in dec if d.get("duplicate_of") and d["duplicate_of"] not in selected]
    if orphans:
        problems.append(f"dedup: {len(orphans)} duplicates point at a sample that is not selected, e.g. {orphans[:3]}")
    if manifest is not None and manifest.get("samples") != states.get("selected", 0):
        problems.append(f"accounting: {states.get('selected', 0)} selected but the manifest says "
                        f"{manifest.get('samples')} written")
    return len(selected)


def _check_input_rows(lay: RunLayout, n_download_rows: int, problems: list[str]) -> int:
    """Download result rows + rows refused before any fetch = input rows; return the input rows."""

    if not lay.input_files():
        return 0
    n_input = sum(read_metadata(p).num_rows for p in lay.input_files())  # one file, or one per part
    n_refused = sum(read_metadata(p).num_rows for p in lay.refused_files())
    if (n_download_rows or n_refused) and n_download_rows + n_refused != n_input:
        problems.append(f"download: {n_download_rows} result rows + {n_refused} refused URLs for {n_input} "
                        f"input rows")
    return n_input


def _verify_selected(lay: RunLayout, manifest: dict, problems: list[str]) -> list[str]:
    """Every curated shard the manifest lists: tar and parquet present, their sha256 as recorded, keys
    and counts agreeing; no shard on disk that it does not list; no key twice."""
    from t2i_curate.pipeline.write.stage import TAR_SHA_KEY

    out: list[str] = []
    seen: Counter = Counter()
    listed = {e["shard"] for e in manifest["shards"]}
    on_disk = {shard_name(s) for s in set(shard_ids(lay.selected, ".tar")) | set(shard_ids(lay.selected, ".parquet"))}
    if on_disk - listed:
        out.append(f"selected: shards on disk not in the manifest: {sorted(on_disk - listed)[:10]}")
    for e in manifest["shards"]:
        tar, parquet = lay.selected / f"{e['shard']}.tar", lay.selected / f"{e['shard']}.parquet"
        absent = [p.name for p in (tar, parquet) if not p.exists()]
        if absent:
            out.append(f"selected/{e['shard']}: {' and '.join(absent)} missing (listed in the manifest)")
            continue
        tar_sha = sha256_file(tar)
        if tar_sha != e["sha256"]:
            out.append(f"selected/{e['shard']}.tar: sha256 differs from the manifest")
        if e.get("parquet_sha256") and sha256_file(parquet) != e["parquet_sha256"]:
            out.append(f"selected/{e['shard']}.parquet: sha256 differs from the manifest")
        keys = _tar_keys(tar, problems)
        table = _parquet_table(parquet, problems, ["key"])
        rows = [] if table is None else table.to_pylist()
        recorded = ({} if table is None else table.schema.metadata or {}).get(TAR_SHA_KEY, b"").decode()
        if recorded and recorded != tar_sha:
            out.append(f"selected/{e['shard']}.tar: sha256 differs from the one its parquet recorded")
        if rows and "key" not in rows[0]:
            out.append(f"selected/{e['shard']}.parquet: not a curated shard's table (no key column)")
            rows = []
        if sorted(keys) != sorted(r["key"] for r in rows) or len(keys) != e["samples"]:
            out.append(f"selected/{e['shard']}: tar has {len(keys)} samples, parquet {len(rows)}, "
                       f"manifest {e['samples']}")
        seen.update(keys)
    dup = [k for k, c in seen.items() if c > 1]
    if dup:
        out.append(f"selected: {len(dup)} keys appear more than once across shards, e.g. {dup[:5]}")
    return out
