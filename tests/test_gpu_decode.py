"""score.decode: gpu -- the device path (run on the CPU here, the same code) against exact decoding."""

import io
import tarfile

import numpy as np
import pytest

from t2i_curate.pipeline.core.config import ScoreConfig
from t2i_curate.pipeline.core.errors import UserError

# photo-like JPEGs, device path on the CPU vs exact, in normalised units: measured max 0.035 (2 levels of 8 bits,
# on the watermark input of a 160x120 JPEG upscaled), mean <= 0.0006 per input (Pillow's fixed-point
# resampling rounds differently from float; the CPU JPEG decoders agree to the bit)
MAX_DIFF, MEAN_DIFF = 0.05, 0.002


def _photo(w, h, seed=0, mode="RGB", fmt="JPEG", **kw) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def _tar(tmp_path, members: dict[str, bytes]):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _transforms(cpu_inputs=False):
    from t2i_curate.filters.clip import tiny_clip
    from t2i_curate.filters.watermark import INPUT, watermark_transform

    t = {"clip": tiny_clip("x").preprocess, INPUT: watermark_transform()}
    if cpu_inputs:  # scorers that need the PIL image: always built from the CPU decode
        from functools import partial

        from t2i_curate.filters.phash import gray32
        from t2i_curate.filters.text import resize_rgb

        t.update({"phash": gray32, "text": partial(resize_rgb, side=320)})
    return t


def _run(tar, keys, transforms, decode, device="cpu"):
    """key -> (inputs of that key | None, error | None), through the pipeline's batch iterators."""
    from t2i_curate.pipeline.score.shards import shard_batches

    scfg = ScoreConfig(decode=decode, batch_size=4)
    rows = [{"key": k} for k in keys]
    if decode == "gpu":
        from t2i_curate.pipeline.score.gpu_decode import iter_gpu_batches

        batches = iter_gpu_batches(rows, tar, transforms, scfg, device=device)
    else:
        batches = shard_batches(rows, tar, transforms, scfg, None)
    out = {}
    for brows, inputs, errors in batches:
        ok = [r["key"] for r in brows if r["key"] not in errors]
        for r in brows:
            out[r["key"]] = (None, errors[r["key"]]) if r["key"] in errors else (
                {n: v[ok.index(r["key"])] for n, v in inputs.items()}, None)
    return out


def _as_np(v):
    return v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v)


def test_plans_cover_clip_and_watermark_and_nothing_else():
    from t2i_curate.pipeline.score.gpu_decode import plan_of, split_transforms

    t = _transforms(cpu_inputs=True)
    plans, cpu = split_transforms(t)
    assert sorted(plans) == ["clip", "watermark:256x256"] and sorted(cpu) == ["phash", "text"]
    assert plans["clip"].ops == (("resize", (224,), None, "bicubic"), ("crop", (224, 224)))
    assert plans["watermark:256x256"].ops == (("resize", (256, 256), None, "bilinear"),)
    from torchvision import transforms as T  # noqa: N812

    assert plan_of(T.Compose([T.Resize(8, interpolation=T.InterpolationMode.NEAREST), T.ToTensor()])) is None
    assert plan_of(T.Compose([T.Resize(8), T.ToTensor(), T.RandomHorizontalFlip()])) is None


def test_device_path_on_cpu_is_close_to_exact(tmp_path):
    """Sizes down- and up-scaled, landscape and portrait, a grayscale JPEG: close, not equal."""
    from PIL import Image

    sizes = [(1024, 768), (768, 1024), (640, 427), (160, 120), (300, 300)]
    members = {f"{i:09d}.jpg": _photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)}
    members["000000009.jpg"] = _photo(500, 375, seed=9, mode="L")
    tar = _tar(tmp_path, members)
    keys = sorted(k.split(".")[0] for k in members)
    transforms = _transforms()
    exact, gpu = _run(tar, keys, transforms, "exact"), _run(tar, keys, transforms, "gpu")
    diffs = []
    for k in keys:
        for name in transforms:
            a, b = exact[k][0][name], gpu[k][0][name]
            assert a.shape == b.shape and b.dtype == a.dtype, (k, name)
            diffs.append((b - a).abs())
    worst = max(float(d.max()) for d in diffs)
    mean = float(np.mean([float(d.mean()) for d in diffs]))
    assert worst < MAX_DIFF and mean < MEAN_DIFF, (worst, mean)
    assert worst > 0, "resampling in float should differ somewhere from PIL's fixed point"
    assert Image.open(io.BytesIO(members["000000009.jpg"])).mode == "L"


def test_png_and_cmyk_fall_back_to_exact_bit_for_bit(tmp_path):
    members = {"000000000.png": _photo(400, 300, fmt="PNG"), "000000001.jpg": _photo(400, 300, mode="CMYK"),
               "000000002.webp": _photo(300, 400, fmt="WEBP"), "000000003.jpg": _photo(320, 240)}
    tar = _tar(tmp_path, members)
    keys = sorted(k.split(".")[0] for k in members)
    transforms = _transforms(cpu_inputs=True)
    exact, gpu = _run(tar, keys, transforms, "exact"), _run(tar, keys, transforms, "gpu")
    for k in keys:
        for name in transforms:
            same = np.array_equal(_as_np(exact[k][0][name]), _as_np(gpu[k][0][name]))
            # the fallbacks and every CPU-only input equal exact; the device-decoded JPEG's tensors need not
            assert same or (k == "000000003" and name in ("clip", "watermark:256x256")), (k, name)


def test_corrupt_jpegs_are_per_sample_errors(tmp_path):
    good = _photo(320, 240)
    members = {
        "000000000.jpg": good,
        "000000001.jpg": good[: len(good) // 2],  # truncated: no EOI, the CPU path reports it
        "000000002.jpg": good[:600] + b"\xff\xd9",  # passes the header check, the decoder rejects it
        "000000003.jpg": b"\xff\xd8\xff" + b"x" * 50 + b"\xff\xd9",
        "000000004.jpg": _photo(200, 100, seed=4),
    }
    tar = _tar(tmp_path, members)
    keys = sorted(k.split(".")[0] for k in members)
    out = _run(tar, keys, _transforms(cpu_inputs=True), "gpu")
    exact = _run(tar, keys, _transforms(cpu_inputs=True), "exact")
    assert set(out) == set(keys)
    for k in ("000000001", "000000002", "000000003"):
        assert out[k][0] is None and out[k][1].startswith("decode: "), out[k]
        assert exact[k][1] is not None
    for k in ("000000000", "000000004"):
        assert out[k][1] is None and out[k][0]["clip"].shape == (3, 224, 224)


def test_device_rejection_falls_back_to_the_cpu(tmp_path, monkeypatch):
    """A JPEG the device decoder refuses (CMYK quirks, ...) is decoded by PIL: its inputs equal exact."""
    from t2i_curate.pipeline.score import gpu_decode

    real, calls = gpu_decode.decode_jpegs, []

    def first_rejected(datas, device):
        calls.append(len(datas))
        return [RuntimeError("nvjpeg says no"), *real(datas[1:], device)]

    monkeypatch.setattr(gpu_decode, "decode_jpegs", first_rejected)
    members = {"000000000.jpg": _photo(300, 200), "000000001.jpg": _photo(200, 300, seed=1)}
    tar = _tar(tmp_path, members)
    transforms = _transforms()
    exact, gpu = _run(tar, ["000000000", "000000001"], transforms, "exact"), _run(
        tar, ["000000000", "000000001"], transforms, "gpu")
    for name in transforms:
        assert np.array_equal(_as_np(exact["000000000"][0][name]), _as_np(gpu["000000000"][0][name]))
        assert gpu["000000001"][0][name].shape == exact["000000001"][0][name].shape
    assert calls == [2], "both JPEGs went to the device decoder in one batch"


def test_gpu_decode_is_refused_without_cuda(monkeypatch, tmp_path):
    import torch

    from t2i_curate.pipeline.score.gpu_decode import decode_device
    from t2i_curate.pipeline.score.shards import shard_batches

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("auto", "cuda", "cpu"):
        with pytest.raises(UserError, match=r"score\.decode is 'gpu'"):
            decode_device(ScoreConfig(decode="gpu", device=dev))
    assert decode_device(ScoreConfig(decode="gpu"), allow_cpu=True) == "cpu"
    tar = _tar(tmp_path, {"000000000.jpg": _photo(64, 64)})
    with pytest.raises(UserError, match="score.decode"):
        next(iter(shard_batches([{"key": "000000000"}], tar, _transforms(), ScoreConfig(decode="gpu"), None)))
    with pytest.raises(ValueError, match="decode"):
        ScoreConfig(decode="nvjpeg")


@pytest.mark.gpu
def test_cuda_decode_is_close_to_exact(tmp_path, shared):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    names = ["people_zidane.jpg", "people_bus.jpg", "i2d_123_456.jpg", "i2d_524_316.jpg"]
    members = {f"{i:09d}.jpg": (shared / "images" / n).read_bytes() for i, n in enumerate(names)}
    members["000000009.jpg"] = _photo(1024, 768)
    tar = _tar(tmp_path, members)
    keys = sorted(k.split(".")[0] for k in members)
    transforms = _transforms(cpu_inputs=True)
    exact, gpu = _run(tar, keys, transforms, "exact"), _run(tar, keys, transforms, "gpu", device="cuda")
    for k in keys:
        for name in ("clip", "watermark:256x256"):
            v = gpu[k][0][name]
            assert v.device.type == "cuda"
            d = (v.cpu() - exact[k][0][name]).abs()
            # nvJPEG's IDCT / chroma upsampling add to the resampling rounding: a looser bound than on CPU
            assert float(d.max()) < 0.25 and float(d.mean()) < 0.02, (k, name, float(d.max()), float(d.mean()))
        assert np.array_equal(_as_np(gpu[k][0]["phash"]), _as_np(exact[k][0]["phash"]))
