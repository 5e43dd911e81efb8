"""retry-failed re-downloads only the rows that failed, and merges them under their keys."""

import tarfile

import pyarrow.parquet as pq
from conftest import curate
from PIL import Image

from t2i_curate.pipeline.download.demo import serve_folder


def test_retry_failed_recovers_rows(tmp_path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    for i in range(6):
        if i % 2 == 0:  # odd images are missing on the first pass
            Image.new("RGB", (300 + i, 200), (i * 40, 0, 0)).save(site / "img" / f"{i}.jpg")
    with serve_folder(site) as base:
        urls = tmp_path / "u.jsonl"
        urls.write_text("".join(f'{{"URL": "{base}/img/{i}.jpg", "TEXT": "red image number {i}", "hash": {i}}}\n'
                                for i in range(6)))
        args = ["--set", f"runs_dir={tmp_path / 'runs'}", "--set", "name=r", "--urls", urls,
                "--set", "download.processes=1", "--set", "download.samples_per_shard=4"]
        curate("download", *args)
        run = tmp_path / "runs" / "r" / "download"
        first = pq.read_table(run / "00000.parquet").to_pylist() + pq.read_table(run / "00001.parquet").to_pylist()
        assert sum(r["status"] == "success" for r in first) == 3
        for i in (1, 3):  # two of the three come back
            Image.new("RGB", (300 + i, 200), "blue").save(site / "img" / f"{i}.jpg")
        p = curate("retry-failed", *args)
    after = pq.read_table(run / "00000.parquet").to_pylist() + pq.read_table(run / "00001.parquet").to_pylist()
    by_row = {r["input_row"]: r for r in after}
    assert len(after) == 6 and len({r["key"] for r in after}) == 6
    assert [by_row[i]["status"] == "success" for i in range(6)] == [True, True, True, True, True, False]
    assert by_row[3]["original_width"] == 303 and by_row[3]["hash"] == 3
    keys_before = {r["input_row"]: r["key"] for r in first}
    assert all(by_row[i]["key"] == keys_before[i] for i in range(6))
    names = []
    for s in ("00000", "00001"):
        with tarfile.open(run / f"{s}.tar") as tf:
            names += [m.name for m in tf]
    assert f"{by_row[3]['key']}.jpg" in names and len(names) == len(set(names)) == 5 * 3
    assert "1 recovered" not in p.stderr
