"""`curate verify RUN`: check every shard of every stage against its parquet and the manifest.

Returns a list of problems (empty when the run is sound): sample counts and
keys of each tar against its parquet, each curated shard's sha256 against
``manifest.json``, duplicate keys across shards, scores for every download
success, and the accounting identity written + dropped + failed = input.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

from pipeline.io import sha256_file, shard_ids


class VerifyError(RuntimeError):
    """The run has problems; the message lists every one."""


def check_run(run_dir: Path) -> int:
    """Raise :class:`VerifyError` listing every problem; return the number of checks passed."""
    problems = verify_run(run_dir)
    if problems:
        raise VerifyError(f"verify {run_dir}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))
    return 0


def _tar_keys(path: Path, problems: list[str]) -> Counter:
    keys: Counter = Counter()
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile() and not m.name.endswith((".json", ".txt")):
                    keys[m.name.split("/")[-1].partition(".")[0]] += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{path}: unreadable tar: {e}")
    return keys


def _parquet_rows(path: Path, problems: list[str], columns: list[str]) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except Exception as e:  # any unreadable parquet is a problem to report, not a crash
        problems.append(f"{path}: unreadable parquet: {e}")
        return []


def verify_run(run_dir: Path) -> list[str]:
    from pipeline.download import INPUT_FILE, finished_shards

    run = Path(run_dir)
    problems: list[str] = []
    ddir = run / "download"
    success: set[str] = set()
    n_download_rows = 0
    for s in finished_shards(ddir):
        rows = _parquet_rows(ddir / f"{s:05d}.parquet", problems, ["key", "status"])
        n_download_rows += len(rows)
        ok = {r["key"] for r in rows if r["status"] == "success"}
        success |= ok
        in_tar = _tar_keys(ddir / f"{s:05d}.tar", problems)
        if set(in_tar) != ok:
            problems.append(f"download/{s:05d}: tar holds {len(in_tar)} images, parquet says {len(ok)} successes "
                            f"(missing {sorted(ok - set(in_tar))[:3]}, extra {sorted(set(in_tar) - ok)[:3]})")
        dup = [k for k, c in in_tar.items() if c > 1]
        if dup:
            problems.append(f"download/{s:05d}: duplicate samples in the tar: {dup[:5]}")
    scored: set[str] = set()
    for s in shard_ids(run / "scores", ".parquet"):
        scored |= {r["key"] for r in _parquet_rows(run / "scores" / f"{s:05d}.parquet", problems, ["key"])}
    if scored and success - scored:
        problems.append(f"scores: {len(success - scored)} downloaded samples have no scores")
    problems += _verify_selected(run, problems)
    n_input = 0
    if (ddir / INPUT_FILE).exists():
        import pyarrow.parquet as pq

        n_input = pq.read_metadata(ddir / INPUT_FILE).num_rows
        if n_download_rows and n_download_rows != n_input:
            problems.append(f"download: {n_download_rows} result rows for {n_input} input rows")
    dec_path = run / "selected" / "decisions.parquet"
    if dec_path.exists():
        dec = _parquet_rows(dec_path, problems, ["key", "state"])
        states = Counter(d["state"] for d in dec)
        if len(dec) != n_input:
            problems.append(f"accounting: {len(dec)} decisions for {n_input} input rows")
        if len({d["key"] for d in dec}) != len(dec):
            problems.append("accounting: a key has more than one decision")
        manifest = run / "selected" / "manifest.json"
        if manifest.exists():
            written = json.loads(manifest.read_text()).get("samples")
            if written != states.get("selected", 0):
                problems.append(f"accounting: {states.get('selected', 0)} selected but the manifest says {written} "
                                f"written")
    return problems


def _verify_selected(run: Path, problems: list[str]) -> list[str]:
    out: list[str] = []
    sel = run / "selected"
    manifest_path = sel / "manifest.json"
    if not manifest_path.exists():
        return out
    manifest = json.loads(manifest_path.read_text())
    seen: Counter = Counter()
    listed = {e["shard"] for e in manifest["shards"]}
    on_disk = {f"{s:05d}" for s in shard_ids(sel, ".tar")}
    if on_disk != listed:
        out.append(f"selected: shards on disk {sorted(on_disk - listed)} not in the manifest, "
                   f"{sorted(listed - on_disk)} missing")
    for e in manifest["shards"]:
        tar = sel / f"{e['shard']}.tar"
        if not tar.exists():
            continue
        if sha256_file(tar) != e["sha256"]:
            out.append(f"selected/{e['shard']}.tar: sha256 differs from the manifest")
        keys = _tar_keys(tar, problems)
        rows = _parquet_rows(sel / f"{e['shard']}.parquet", problems, ["key"])
        if sorted(keys) != sorted(r["key"] for r in rows) or len(keys) != e["samples"]:
            out.append(f"selected/{e['shard']}: tar has {len(keys)} samples, parquet {len(rows)}, "
                       f"manifest {e['samples']}")
        seen.update(keys)
    dup = [k for k, c in seen.items() if c > 1]
    if dup:
        out.append(f"selected: {len(dup)} keys appear more than once across shards, e.g. {dup[:5]}")
    return out
