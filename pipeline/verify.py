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

from t2i_curate.pipeline.errors import StageIncomplete
from t2i_curate.pipeline.io import read_metadata, read_schema, read_table, sha256_file, shard_ids
from t2i_curate.pipeline.layout import RunLayout, shard_name
from t2i_curate.pipeline.tars import iter_members


class VerifyError(StageIncomplete):
    """The run has problems; the message lists every one."""


def check_run(run_dir: Path) -> int:
    """Raise :class:`VerifyError` listing every problem; return the number of checks passed."""
    problems = verify_run(run_dir)
    if problems:
        raise VerifyError(f"verify {run_dir}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))
    return 0


def _tar_keys(path: Path, problems: list[str]) -> Counter:
    """Samples (image members) per key; a damaged tar is a problem."""
    errors: list[str] = []
    keys = Counter(key for key, _, _ in iter_members(path, skip_exts=("json", "txt"), errors=errors))
    problems += [f"{path}: unreadable tar: {e}" for e in errors]
    return keys


def _parquet_rows(path: Path, problems: list[str], columns: list[str]) -> list[dict]:

    try:
        return read_table(path, columns=columns).to_pylist()
    except Exception as e:  # any unreadable parquet is a problem to report, not a crash
        problems.append(f"{path}: unreadable parquet: {e}")
        return []


def _verify_downloads(lay: RunLayout, problems: list[str]) -> tuple[set[str], int]:
    """Each finished download tar against its parquet; returns the successful keys and the row count."""
    success: set[str] = set()
    n_rows = 0
    for s in lay.finished_downloads():
        rows = _parquet_rows(lay.download_parquet(s), problems, ["key", "status"])
        n_rows += len(rows)
        ok = {r["key"] for r in rows if r["status"] == "success"}
        success |= ok
        in_tar = _tar_keys(lay.download_tar(s), problems)
        if set(in_tar) != ok:
            problems.append(f"download/{shard_name(s)}: tar holds {len(in_tar)} images, parquet says {len(ok)} "
                            f"successes (missing {sorted(ok - set(in_tar))[:3]}, extra {sorted(set(in_tar) - ok)[:3]})")
        dup = [k for k, c in in_tar.items() if c > 1]
        if dup:
            problems.append(f"download/{shard_name(s)}: duplicate samples in the tar: {dup[:5]}")
    return success, n_rows


def verify_run(run_dir: Path) -> list[str]:
    lay = RunLayout(run_dir)
    problems: list[str] = []
    success, n_download_rows = _verify_downloads(lay, problems)
    scored: set[str] = set()
    for s in shard_ids(lay.scores, ".parquet"):
        scored |= {r["key"] for r in _parquet_rows(lay.score_parquet(s), problems, ["key"])}
    if scored and success - scored:
        problems.append(f"scores: {len(success - scored)} downloaded samples have no scores")
    problems += _verify_selected(lay, problems)
    n_input = _check_input_rows(lay, n_download_rows, problems)
    if lay.decisions.exists():
        _check_decisions(lay, n_input, problems)
    return problems


def _check_decisions(lay: RunLayout, n_input: int, problems: list[str]) -> None:

    has_dup = "duplicate_of" in read_schema(lay.decisions).names
    dec = _parquet_rows(lay.decisions, problems, ["key", "state"] + (["duplicate_of"] if has_dup else []))
    states = Counter(d["state"] for d in dec)
    if len(dec) != n_input:
        problems.append(f"accounting: {len(dec)} decisions for {n_input} input rows")
    if len({d["key"] for d in dec}) != len(dec):
        problems.append("accounting: a key has more than one decision")
    selected = {d["key"] for d in dec if d["state"] == "selected"}
    orphans = [d["key"] for d in dec if d.get("duplicate_of") and d["duplicate_of"] not in selected]
    if orphans:
        problems.append(f"dedup: {len(orphans)} duplicates point at a sample that is not selected, e.g. {orphans[:3]}")
    if lay.manifest.exists():
        written = json.loads(lay.manifest.read_text()).get("samples")
        if written != states.get("selected", 0):
            problems.append(f"accounting: {states.get('selected', 0)} selected but the manifest says {written} "
                            f"written")


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


def _verify_selected(lay: RunLayout, problems: list[str]) -> list[str]:
    out: list[str] = []
    if not lay.manifest.exists():
        return out
    manifest = json.loads(lay.manifest.read_text())
    seen: Counter = Counter()
    listed = {e["shard"] for e in manifest["shards"]}
    on_disk = {shard_name(s) for s in shard_ids(lay.selected, ".tar")}
    if on_disk != listed:
        out.append(f"selected: shards on disk {sorted(on_disk - listed)} not in the manifest, "
                   f"{sorted(listed - on_disk)} missing")
    for e in manifest["shards"]:
        tar = lay.selected / f"{e['shard']}.tar"
        if not tar.exists():
            continue
        if sha256_file(tar) != e["sha256"]:
            out.append(f"selected/{e['shard']}.tar: sha256 differs from the manifest")
        keys = _tar_keys(tar, problems)
        rows = _parquet_rows(tar.with_suffix(".parquet"), problems, ["key"])
        if sorted(keys) != sorted(r["key"] for r in rows) or len(keys) != e["samples"]:
            out.append(f"selected/{e['shard']}: tar has {len(keys)} samples, parquet {len(rows)}, "
                       f"manifest {e['samples']}")
        seen.update(keys)
    dup = [k for k, c in seen.items() if c > 1]
    if dup:
        out.append(f"selected: {len(dup)} keys appear more than once across shards, e.g. {dup[:5]}")
    return out
