"""Reference-faithful inputs, real presets, weight lookup, FID cache keys, funnel grouping."""

import io
import json
import tarfile
import time

import numpy as np
import pytest
from conftest import curate

from t2i_curate.pipeline.core.config import ModelsConfig, load_config, resolve_preset


def _jpeg(w=1024, h=768, seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: a photo-like JPEG whose draft decode visibly differs
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decoded(tmp_path, data: bytes, draft):
    from t2i_curate.filters.clip import tiny_clip
    from t2i_curate.filters.watermark import watermark_transform
    from t2i_curate.pipeline.score.decode import TarImages

    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("000000000.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    transforms = {"clip": tiny_clip("x").preprocess, "watermark": watermark_transform()}
    [(key, tensors, err)] = list(TarImages(tar, ["000000000"], transforms, draft))
    assert err is None
    return tensors, transforms


def test_exact_decode_reproduces_the_reference_inputs(tmp_path):
    """'exact' = PIL full decode + convert('RGB') + the reference transforms, to the bit."""
    from PIL import Image

    data = _jpeg()
    tensors, transforms = _decoded(tmp_path, data, draft=None)
    ref_img = Image.open(io.BytesIO(data)).convert("RGB")  # what LAION's scripts do
    for name, t in transforms.items():
        assert np.array_equal(tensors[name].numpy(), t(ref_img).numpy()), name
    import hashlib

    assert tensors["image_sha256"] == hashlib.sha256(data).hexdigest()  # the stored bytes, recorded in scores/
    fast, _ = _decoded(tmp_path, data, draft=256)
    diff = max(float((fast[n] - tensors[n]).abs().max()) for n in transforms)
    assert diff > 0.01, "fast mode should differ from exact on a 1024x768 JPEG"


def test_every_preset_but_the_demo_uses_real_models():
    names = sorted(p.stem for p in resolve_preset("demo").parent.glob("*.yaml"))
    assert len(names) >= 6
    for name in names:
        preset = load_config(name).score.models.preset
        assert preset == ("tiny" if name == "demo" else "real"), name
    assert load_config(None).score.models.preset == "real"


def test_real_preset_offline_fails_before_any_download(tmp_path):
    urls = tmp_path / "urls.csv"
    urls.write_text("URL,TEXT\nhttp://127.0.0.1:9/a.jpg,a photo of a horse\n")
    t = time.perf_counter()
    r = curate("run", "--config", "sd-v1", "--urls", urls, "--set", f"runs_dir={tmp_path / 'runs'}",
               "--set", f"score.models.cache_dir={tmp_path / 'empty'}", check=False)
    assert r.returncode == 2, r.stderr
    assert time.perf_counter() - t < 60
    assert "missing" in r.stderr and "local_weights" in r.stderr
    assert not (tmp_path / "runs" / "sd-v1" / "download").exists()


def _tiny_arch(tmp_path) -> str:
    import open_clip

    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
    (tmp_path / "tinytest-B-32.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tinytest-B-32.json")
    return "tinytest-B-32"


def test_openai_torchscript_archive_loads_as_local_weights(tmp_path, monkeypatch):
    """OpenAI's own .pt files are TorchScript archives; weights_only=True cannot read them. Only an
    archive with OpenAI's published sha256 is loaded (TorchScript can carry code)."""
    import open_clip
    import torch

    from t2i_curate.filters import clip
    from t2i_curate.filters.clip import is_torchscript, load_clip
    from t2i_curate.pipeline.core.io import sha256_file
    from t2i_curate.pipeline.core.weights import WeightsMismatchError

    arch = _tiny_arch(tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model(arch).eval()
    img, txt = torch.randn(2, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    path = tmp_path / "tiny-openai.pt"
    torch.jit.trace(model, (img[:1], txt), check_trace=False, strict=False).save(str(path))
    assert is_torchscript(path)
    mcfg = ModelsConfig(preset="real", local_weights={f"{arch}/openai": str(path)})
    with pytest.raises(WeightsMismatchError, match="not the one OpenAI published"):
        load_clip(f"{arch}/openai", mcfg)
    assert clip.openai_sha256("ViT-L-14", "openai").startswith("b8cca3fd")  # from OpenAI's URL
    monkeypatch.setattr(clip, "openai_sha256", lambda arch, tag: sha256_file(path))  # as if OpenAI's file
    bundle = load_clip(f"{arch}/openai", mcfg)
    with torch.inference_mode():
        assert torch.allclose(bundle.model.encode_image(img), model.encode_image(img), atol=1e-5)
    assert not bundle.tiny and bundle.name == f"{arch}/openai"


def test_clip_found_in_the_default_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from t2i_curate.pipeline.core.weights import clip_checkpoint

    hub = tmp_path / "hf"
    repo = hub / "models--timm--vit_large_patch14_clip_224.openai"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    mcfg = ModelsConfig(preset="real", cache_dir=str(tmp_path / "ours"))
    assert clip_checkpoint("ViT-L-14/openai", mcfg).endswith("abc123/open_clip_model.safetensors")


def test_fid_reference_cache_key_covers_the_resize_protocol(tmp_path, monkeypatch):
    from t2i_curate.eval import fid
    from t2i_curate.pipeline.core.config import EvalConfig

    keys = {p: fid.reference_cache_key("/some/folder", tmp_path, fid.feature_spec(EvalConfig(fid_protocol=p), True), 100)
            for p in ("torch-fidelity", "clean", "legacy-crop")}
    assert len(set(keys.values())) == 3
    spec = fid.feature_spec(EvalConfig(fid_protocol="clean"), True)
    monkeypatch.setitem(fid._PREPROCESS, "clean", "a changed resize")  # same name, different resize
    assert fid.reference_cache_key("/some/folder", tmp_path, spec, 100) != keys["clean"]


def test_funnel_groups_failures_by_error_class():
    from t2i_curate.pipeline.report.funnel import error_class, group_failures

    raw = [("download", f"<urlopen error [Errno -2] Name or service not known: http://h{i}.example/a b.jpg>", 1)
           for i in range(50)]
    raw += [("download", "HTTP Error 404: Not Found", 7), ("download", "HTTP Error 500: Internal Server Error", 2),
            ("score", "decode: OSError: cannot open /tmp/x/y/z.jpg at offset 1234", 3)]
    groups = group_failures(raw)
    assert [(g["stage"], g["samples"]) for g in groups] == [("download", 50), ("download", 7), ("score", 3),
                                                            ("download", 2)]
    assert groups[1]["error"] == "HTTP Error 404: Not Found"
    assert "http" not in groups[0]["error"] and groups[0]["example"].startswith("<urlopen error")
    assert error_class("cannot open /tmp/x/y/z.jpg at offset 1234") == "cannot open <path> at offset <n>"


def test_eval_of_a_real_model_never_uses_the_tiny_scoring_clip():
    """The demo scores with tiny models; an eval of a real checkpoint on it must load real CLIPs."""
    from t2i_curate.eval.evaluate import eval_models

    assert eval_models(load_config("demo")).preset == "tiny"  # the tiny pipeline
    assert eval_models(load_config("demo", ["eval.model=stable-diffusion-v1-5/stable-diffusion-v1-5"])).preset == "real"
    assert eval_models(load_config("demo", ["eval.model=x/y", "eval.models=tiny"])).preset == "tiny"


def _scored_run(tmp_path, scorers: str):

    from t2i_curate.pipeline.score.stage import score_stage

    cfg = load_config("demo", [f"runs_dir={tmp_path}", "name=t", "workers=1", "select.rules=[]",
                               f"score.scorers={scorers}"])
    score_stage(cfg, tmp_path / "t", [0])
    return cfg


def test_select_refuses_scores_made_with_other_settings(tmp_path):
    from test_structure import _fake_download

    from t2i_curate.pipeline.core.errors import StageOrderError
    from t2i_curate.pipeline.select.stage import select_stage

    _fake_download(tmp_path / "t", ["a red square", "a blue square"])
    _scored_run(tmp_path, "[resolution]")
    other = load_config("demo", [f"runs_dir={tmp_path}", "name=t", "workers=1", "select.rules=[]",
                                 "score.scorers=[resolution, aesthetic]"])
    with pytest.raises(StageOrderError, match="other scorer settings"):
        select_stage(other, tmp_path / "t")


def test_write_rewrites_a_shard_whose_scores_changed(tmp_path):
    """Same keys selected, other models: the curated shard and its json follow the new scores."""
    import pyarrow.parquet as pq
    from test_structure import _fake_download

    from t2i_curate.pipeline.select.stage import select_stage
    from t2i_curate.pipeline.write.stage import write_stage

    _fake_download(tmp_path / "t", ["a red square", "a blue square"])
    for scorers in ("[resolution]", "[resolution, aesthetic]"):
        cfg = _scored_run(tmp_path, scorers)
        select_stage(cfg, tmp_path / "t")
        write_stage(cfg, tmp_path / "t")
    shard = tmp_path / "t" / "selected" / "00000"
    assert "aesthetic_score" in pq.read_schema(shard.with_suffix(".parquet")).names
    with tarfile.open(shard.with_suffix(".tar")) as tf:
        meta = json.loads(tf.extractfile(next(m for m in tf if m.name.endswith(".json"))).read())
    assert "aesthetic_score" in meta


def test_scoring_without_images_still_records_samples_missing_from_the_tar(tmp_path):
    """Resolution alone reads no image; a sample the truncated tar lost must still fail, not be written."""
    import pyarrow.parquet as pq
    from test_structure import _fake_download

    run = tmp_path / "t"
    _fake_download(run, ["a red square", "a blue square", "a green square"])
    tar = run / "download" / "00000.tar"
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf][:2]
    with tarfile.open(tar, "w") as tf:  # the third sample is gone
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    _scored_run(tmp_path, "[resolution]")
    rows = {r["key"]: r for r in pq.read_table(run / "scores" / "00000.parquet").to_pylist()}
    assert rows["000000002"]["score_status"] == "failed" and "missing" in rows["000000002"]["score_error"]
    assert rows["000000000"]["score_status"] == "ok"


def test_sampler_remakes_images_made_with_other_settings(tmp_path):
    import pyarrow.parquet as pq

    from t2i_curate.eval.sampler import sample
    from t2i_curate.pipeline.core.config import EvalConfig

    prompts = [{"id": "p0", "category": "general", "prompt": "a red barn"}]
    for steps in (2, 2, 3):
        sample(EvalConfig(height=32, width=32, steps=steps, samples_per_prompt=1, batch_size=1), prompts, tmp_path)
        rows = pq.read_table(tmp_path / "eval_images.parquet").to_pylist()
        assert [r["steps"] for r in rows] == [steps]
